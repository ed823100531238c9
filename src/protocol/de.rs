//! Reading back the response shapes whose writing is done by hand (shapes.rs): a
//! [`Timestamp`], [`TypeBytes`] and [`PurposeBytes`], so that every answer can be read into its
//! typed shape (the typed client, the CLI, tests).

use super::enums::MemoryAllocationType;
use super::shapes::{PurposeBytes, Timestamp, TypeBytes};
use serde::de::{Error, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::fmt;

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_rfc3339(&text)
            .map(Timestamp)
            .map_err(|e| D::Error::custom(format!("not an RFC 3339 time `{text}`: {e}")))
    }
}

impl<'de> Deserialize<'de> for TypeBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TypeBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of bytes by allocation type")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TypeBytes, A::Error> {
                let mut out = TypeBytes::default();
                while let Some((kind, bytes)) = map.next_entry::<MemoryAllocationType, u64>()? {
                    out.0[kind.value() as usize % 7] = bytes;
                }
                Ok(out)
            }
        }
        deserializer.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for PurposeBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PurposeBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of bytes by purpose")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PurposeBytes, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, u64>()? {
                    out.push(entry);
                }
                Ok(PurposeBytes(out))
            }
        }
        deserializer.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn hand_written_shapes_read_back_as_written() {
        let t = Timestamp(UNIX_EPOCH + Duration::from_millis(1_709_164_800_123));
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Timestamp>(&text).unwrap(), t);
        let mut b = TypeBytes::default();
        b.0[MemoryAllocationType::Cache.value() as usize] = 7;
        let text = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<TypeBytes>(&text).unwrap(), b);
        let p = PurposeBytes(vec![("kv".into(), 9), ("a".into(), 1)]);
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<PurposeBytes>(&text).unwrap(), p);
    }
}
