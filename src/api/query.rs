//! Query-string typing: a REST query value (always text) becomes the JSON type of the field it
//! fills, as the action's request type says (its JSON Schema, the one the docs show): `true`,
//! `false`, `1`, `0` for a boolean field, a number for a numeric field or an enum field (an
//! enum also takes its integer value). A value that is not of that type stays a string, so the
//! request is refused with INVALID_PARAMETER naming the field.

use super::Action;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::OnceLock;

/// How a query value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// A boolean field.
    Bool,
    /// A number (or an enum that also takes its integer value).
    Number,
    /// Anything else: the text as it is.
    Text,
}

/// The type of `field` in the request of `action`.
pub fn field_type(action: Action, field: &str) -> FieldType {
    static TYPES: OnceLock<HashMap<&'static str, HashMap<String, FieldType>>> = OnceLock::new();
    TYPES
        .get_or_init(|| {
            Action::ALL
                .iter()
                .map(|a| (a.name(), fields_of(*a)))
                .collect()
        })
        .get(action.name())
        .and_then(|fields| fields.get(field))
        .copied()
        .unwrap_or(FieldType::Text)
}

/// A query value as the JSON type of the field it fills in the request of `action`.
pub fn value(action: Action, field: &str, raw: &str) -> Value {
    match field_type(action, field) {
        FieldType::Bool => match raw {
            "true" | "1" => return Value::Bool(true),
            "false" | "0" => return Value::Bool(false),
            _ => {}
        },
        FieldType::Number => {
            if let Ok(n) = serde_json::from_str::<serde_json::Number>(raw) {
                return Value::Number(n);
            }
        }
        FieldType::Text => {}
    }
    Value::String(raw.to_string())
}

/// The type of each field of `action`'s request, read from its JSON Schema.
fn fields_of(action: Action) -> HashMap<String, FieldType> {
    let mut g = SchemaSettings::draft2020_12().into_generator();
    let Some(schema) = action.schemas(&mut g).0 else {
        return HashMap::new();
    };
    let defs: Map<String, Value> = g.take_definitions(true).into_iter().collect();
    let schema = Value::from(schema);
    let target = resolve(&schema, &defs);
    target
        .get("properties")
        .and_then(Value::as_object)
        .map(|props| {
            props
                .iter()
                .map(|(name, s)| (name.clone(), type_of(s, &defs, 0)))
                .collect()
        })
        .unwrap_or_default()
}

/// `schema`, or what its `$ref` names.
fn resolve<'a>(schema: &'a Value, defs: &'a Map<String, Value>) -> &'a Value {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
        .and_then(|name| defs.get(name))
        .unwrap_or(schema)
}

fn type_of(schema: &Value, defs: &Map<String, Value>, depth: u32) -> FieldType {
    let schema = resolve(schema, defs);
    let mut types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if types.contains(&"boolean") {
        return FieldType::Bool;
    }
    if types.iter().any(|t| *t == "integer" || *t == "number") {
        return FieldType::Number;
    }
    types.clear();
    if depth < 4 {
        for key in ["anyOf", "oneOf"] {
            for branch in schema
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                match type_of(branch, defs, depth + 1) {
                    FieldType::Text => {}
                    t => return t,
                }
            }
        }
    }
    FieldType::Text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_values_take_their_fields_types() {
        assert_eq!(value(Action::Clear, "force", "true"), Value::Bool(true));
        assert_eq!(value(Action::GetAllocations, "limit", "5"), json!(5));
        assert_eq!(
            value(Action::GetAllocations, "allocation_type", "2"),
            json!(2)
        );
        assert_eq!(
            value(Action::GetAllocations, "allocation_type", "Cache"),
            json!("Cache")
        );
        assert_eq!(
            value(Action::GetAllocations, "purpose", "123"),
            json!("123")
        );
        assert_eq!(value(Action::GetAllocations, "limit", "x"), json!("x"));
    }

    #[test]
    fn every_typed_field_the_hand_lists_named_is_found_in_the_requests() {
        // The lists http.rs kept by hand before the types said it.
        let bools = [
            (Action::GetStatus, "include_allocations"),
            (Action::GetStatus, "include_usage_stats"),
            (Action::GetStatus, "include_fragmentation"),
            (Action::Clear, "force"),
            (Action::ModelUnload, "force"),
            (Action::Optimize, "force"),
            (Action::Allocate, "persistent"),
            (Action::Optimize, "wait_for_completion"),
            (Action::Transfer, "wait_for_completion"),
        ];
        for (a, f) in bools {
            assert_eq!(field_type(a, f), FieldType::Bool, "{f}");
        }
        let numbers = [
            (Action::GetAllocations, "offset"),
            (Action::GetAllocations, "limit"),
            (Action::Allocate, "size_bytes"),
            (Action::Allocate, "alignment"),
            (Action::Allocate, "timeout_seconds"),
            (Action::Allocate, "allocation_type"),
            (Action::Analytics, "window_seconds"),
            (Action::ModelOptimize, "idle_seconds"),
            (Action::ModelOptimize, "target_bytes"),
            (Action::Optimize, "target_usage_percentage"),
            (Action::Optimize, "optimization_type"),
            (Action::ModelLoad, "keep_alive_seconds"),
        ];
        for (a, f) in numbers {
            assert_eq!(field_type(a, f), FieldType::Number, "{f}");
        }
        for (a, f) in [
            (Action::Transfer, "mode"),
            (Action::ModelOptimize, "strategy"),
            (Action::GetStatus, "device_id"),
        ] {
            assert_eq!(field_type(a, f), FieldType::Text, "{f}");
        }
    }
}
