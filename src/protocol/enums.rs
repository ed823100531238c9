//! The contract's enums: written as PascalCase names, read as names in any case or as the
//! integer values C#'s default enum serialisation produces.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value),+
        }

        impl $name {
            /// Every value, in integer order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The PascalCase name written on the wire.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),+ }
            }

            /// The integer value (C#'s enum value).
            pub fn value(self) -> i64 {
                self as i64
            }

            /// Looks a value up by name, ignoring case.
            pub fn from_name(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.name().eq_ignore_ascii_case(name))
            }

            /// Looks a value up by its integer.
            pub fn from_value(value: i64) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.value() == value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

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

        impl $name {
            fn choices() -> String {
                Self::ALL
                    .iter()
                    .map(|v| format!("{} ({})", v.name(), v.value()))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        }
    };
}

wire_enum! {
    /// The kind of memory a device holds.
    MemoryType {
        /// Not known.
        Unknown = 0,
        /// Host RAM.
        RAM = 1,
        /// GPU memory.
        VRAM = 2,
        /// Host shared memory, mappable by other processes.
        SharedMemory = 3,
        /// Memory shared by host and device.
        UnifiedMemory = 4,
    }
}

wire_enum! {
    /// A device's health, from usage and fragmentation.
    MemoryHealthStatus {
        /// Not known.
        Unknown = 0,
        /// Nothing to do.
        Healthy = 1,
        /// Worth a look: high usage or fragmentation.
        Warning = 2,
        /// Act now.
        Critical = 3,
    }
}

wire_enum! {
    /// What an allocation is for.
    MemoryAllocationType {
        /// Anything.
        General = 0,
        /// Model weights.
        ModelWeights = 1,
        /// Activations.
        Activations = 2,
        /// A cache that `memory.optimize` may reclaim.
        Cache = 3,
        /// Staging buffers for transfers.
        Staging = 4,
        /// Short-lived data that `memory.optimize` may reclaim.
        Temporary = 5,
        /// Budget accounting only, no backing memory.
        Reservation = 6,
    }
}

wire_enum! {
    /// What `memory.optimize` does.
    MemoryOptimizationType {
        /// Release cached pages.
        ClearCache = 0,
        /// Compact allocations.
        Defragment = 1,
        /// Evict idle models.
        EvictIdleModels = 2,
        /// Reclaim until under a target usage.
        ReduceToTarget = 3,
        /// All of the above.
        Full = 4,
    }
}

wire_enum! {
    /// Where a transfer stands.
    TransferStatus {
        /// Waiting to start.
        Queued = 0,
        /// Copying.
        Running = 1,
        /// Done.
        Completed = 2,
        /// Failed; the source is intact.
        Failed = 3,
        /// Cancelled.
        Cancelled = 4,
    }
}

wire_enum! {
    /// How hard a device is pressed for memory.
    PressureLevel {
        /// No pressure.
        None = 0,
        /// Some.
        Low = 1,
        /// Noticeable.
        Moderate = 2,
        /// Requests are likely to wait.
        High = 3,
        /// Requests are failing.
        Critical = 4,
    }
}

wire_enum! {
    /// Where a model stands.
    ModelState {
        /// Being read onto its device.
        Loading = 0,
        /// On its home device.
        Loaded = 1,
        /// Its bytes are on `cpu`.
        Offloaded = 2,
        /// Being removed.
        Unloading = 3,
    }
}

wire_enum! {
    /// What a recommendation of `memory.optimization_recs` advises. The contract names these
    /// as strings only; the integers are this enum's order.
    RecommendationKind {
        /// Defragment the device: free memory is in pieces.
        Defragment = 0,
        /// Free Cache allocations and give back cached pages.
        ClearCache = 1,
        /// Free Cache and Temporary allocations down to a usage target.
        ReduceToTarget = 2,
        /// Move idle models' weights to `cpu`.
        OffloadIdleModels = 3,
        /// Unload idle models.
        UnloadIdleModels = 4,
        /// The budget is below what the device was asked for.
        RaiseBudget = 5,
        /// A persistent allocation has not been touched for a long time.
        ReviewPersistent = 6,
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
