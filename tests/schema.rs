//! docs/protocol.schema.json is the JSON Schema of the stdio messages, generated from the Rust
//! types (`memcoord::transport::openapi::stdio_schema`): it must be current, and real request
//! and response lines must match it. `MEMCOORD_BLESS=1 cargo test --test schema` rewrites it.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::Requests;
use common::inproc::InProcessWorker;
use serde_json::{Value, json};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.schema.json");

#[test]
fn the_stdio_schema_in_docs_is_current_and_real_lines_match_it() {
    let schema = memcoord::transport::openapi::stdio_schema();
    let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
    if std::env::var_os("MEMCOORD_BLESS").is_some() {
        std::fs::write(DOC, &text).unwrap();
    }
    let on_disk = std::fs::read_to_string(DOC).unwrap_or_default();
    assert!(
        on_disk == text,
        "docs/protocol.schema.json is out of date: run `MEMCOORD_BLESS=1 cargo test --test schema`"
    );
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&schema)
        .expect("a valid schema");
    let check = |v: &Value| {
        let errors: Vec<String> = validator.iter_errors(v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{v}\n{errors:?}");
    };

    let mut w = InProcessWorker::small();
    let requests = [
        json!({"request_id": "1", "action": "memory.list_devices"}),
        json!({"request_id": "2", "action": "memory.allocate", "data": {"device_id": "shm", "size_bytes": 4096, "allocation_type": "Cache"}}),
        json!({"request_id": "3", "action": "memory.get_status", "data": {"device_id": "shm", "include_fragmentation": true}}),
        json!({"request_id": "4", "action": "memory.get_pressure", "data": null}),
        json!({"request_id": "5", "action": "memory.analytics", "data": {"device_id": "shm"}}),
        json!({"request_id": "6", "action": "memory.optimization_recs"}),
        json!({"request_id": "7", "action": "memory.get_usage", "data": {"device_id": "nope"}}),
    ];
    for r in &requests {
        check(r);
        let v = w.request(
            r["action"].as_str().unwrap(),
            r.get("data").cloned().unwrap_or(Value::Null),
        );
        check(&v);
    }
    // Lines that are not requests of the contract do not match.
    for bad in [
        json!({"request_id": "", "action": "memory.list_devices"}),
        json!({"request_id": "x", "action": "memory.compact"}),
        json!({"request_id": "x", "action": "memory.allocate", "data": {"device_id": "cpu"}}),
    ] {
        assert!(!validator.is_valid(&bad), "{bad}");
    }
}
