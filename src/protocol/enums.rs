//! The contract's enums: written as PascalCase names, read as names in any case or as the
//! integer values C#'s default enum serialisation produces. The enums themselves are the
//! engine's ([`crate::domain`]); this file gives them their wire form (serde and the JSON
//! schema) and re-exports them, so `protocol::MemoryType` names the same type.

pub use crate::domain::{
    MemoryAllocationType, MemoryHealthStatus, MemoryOptimizationType, MemoryType, ModelState,
    PressureLevel, RecommendationKind, TransferMode, TransferStatus,
};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

macro_rules! wire_enum {
    ($($name:ident),+ $(,)?) => {$(
        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                let names: Vec<&str> = Self::ALL.iter().map(|v| v.name()).collect();
                let values: Vec<i64> = Self::ALL.iter().map(|v| v.value()).collect();
                schemars::json_schema!({
                    "description": "written as its name; read as a name in any case or its integer value",
                    "anyOf": [
                        {"type": "string", "enum": names},
                        {"type": "integer", "enum": values}
                    ]
                })
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct EnumVisitor;
                impl<'de> Visitor<'de> for EnumVisitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "one of {} (a name in any case, or its integer value)", $name::choices())
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::from_name(v).ok_or_else(|| E::custom(format!(
                            "unknown {} `{v}`: expected one of {}", stringify!($name), $name::choices())))
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$name, E> {
                        $name::from_value(v).ok_or_else(|| E::custom(format!(
                            "unknown {} value {v}: expected one of {}", stringify!($name), $name::choices())))
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$name, E> {
                        match i64::try_from(v) {
                            Ok(v) => self.visit_i64(v),
                            Err(_) => Err(E::custom(format!("unknown {} value {v}", stringify!($name)))),
                        }
                    }
                }
                deserializer.deserialize_any(EnumVisitor)
            }
        }
    )+};
}

wire_enum!(
    MemoryType,
    MemoryHealthStatus,
    MemoryAllocationType,
    MemoryOptimizationType,
    TransferStatus,
    PressureLevel,
    ModelState,
    RecommendationKind,
);

/// A transfer's mode is written as `move` or `copy` (the request's `mode` field).
impl Serialize for TransferMode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_out_names_and_integers_in() {
        assert_eq!(
            serde_json::to_string(&MemoryType::VRAM).unwrap(),
            "\"VRAM\""
        );
        let t: MemoryAllocationType = serde_json::from_str("\"reservation\"").unwrap();
        assert_eq!(t, MemoryAllocationType::Reservation);
        let t: MemoryAllocationType = serde_json::from_str("\"TEMPORARY\"").unwrap();
        assert_eq!(t, MemoryAllocationType::Temporary);
        let t: MemoryAllocationType = serde_json::from_str("3").unwrap();
        assert_eq!(t, MemoryAllocationType::Cache);
        assert!(serde_json::from_str::<MemoryAllocationType>("7").is_err());
        assert!(serde_json::from_str::<MemoryAllocationType>("\"Weights\"").is_err());
        assert!(serde_json::from_str::<MemoryAllocationType>("1.0").is_err());
    }
}
