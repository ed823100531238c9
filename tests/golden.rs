//! The wire format, byte for byte: a fixed script of requests (every action, successes and
//! errors) sent to the worker, and its answers compared with `tests/golden/wire.jsonl`.
//!
//! Issue 13 reshapes the code under the protocol; this test is what says the reshaping changed
//! no answer. What varies from run to run is replaced before the comparison, and only that:
//! ids by `<id:N>` (numbered by first appearance), times by `<time>`, durations and rates by
//! `<float>`, the shm file's path by `<shm-file>`, and the figures the host machine decides
//! (its memory, the CPU's own timing) by `<host>`. Everything else, field names, order, types,
//! values and messages, must match exactly.
//!
//! After an intended change of the wire format: `MEMCOORD_BLESS=1 cargo test --test golden`
//! writes the file anew; the diff is then reviewed like code.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, Write};

/// JSON with its objects' keys in the order they came (serde_json's `Value` sorts them, and the
/// order is part of the wire format).
#[derive(Debug, Clone)]
enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
                Ok(Json::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Json, E> {
                serde_json::Number::from_f64(n)
                    .map(Json::Number)
                    .ok_or_else(|| E::custom("not a JSON number"))
            }
            fn visit_str<E>(self, s: &str) -> Result<Json, E> {
                Ok(Json::String(s.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(Json::Array(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
                let mut v = Vec::new();
                while let Some((k, x)) = a.next_entry()? {
                    v.push((k, x));
                }
                Ok(Json::Object(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl Json {
    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => write!(out, "{b}").unwrap(),
            Json::Number(n) => write!(out, "{n}").unwrap(),
            Json::String(s) => out.push_str(&serde_json::to_string(s).unwrap()),
            Json::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    x.write(out);
                }
                out.push(']');
            }
            Json::Object(o) => {
                out.push('{');
                for (i, (k, x)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push(':');
                    x.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// Keys whose values are times.
const TIMES: &[&str] = &[
    "created_at",
    "allocated_at",
    "last_updated",
    "started_at",
    "completed_at",
    "loaded_at",
    "last_used_at",
    "acquired_at",
    "expires_at",
    "at",
];

/// Keys whose values depend on the host (its memory, its clock, the CPU's speed).
const HOST: &[&str] = &[
    "total_memory",
    // The test process's pid (the stdio session's client).
    "client_pid",
    "used_memory",
    "usage_percentage",
    "health",
    "health_score",
    "bandwidth_bytes_per_second",
    "trend_bytes_per_second",
    "stall_ms_10s",
    "stall_ms_60s",
    "allocation_latency_ms",
    "allocations_per_second",
    "samples",
    "progress_percentage",
];

struct Normalizer {
    ids: HashMap<String, usize>,
    /// The model root's path (it names the test's process).
    root: String,
}

fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

impl Normalizer {
    fn id(&mut self, s: &str) -> String {
        let n = self.ids.len() + 1;
        let n = *self.ids.entry(s.to_string()).or_insert(n);
        format!("<id:{n}>")
    }

    fn text(&mut self, s: &str) -> String {
        // Ids inside messages: every UUID-shaped run of hex digits and dashes.
        let mut out = String::new();
        let mut run = String::new();
        let flush = |run: &mut String, out: &mut String, me: &mut Self| {
            if looks_like_uuid(run) {
                let id = me.id(run);
                out.push_str(&id);
            } else {
                out.push_str(run);
            }
            run.clear();
        };
        for c in s.chars() {
            if c.is_ascii_hexdigit() || c == '-' {
                run.push(c);
            } else {
                flush(&mut run, &mut out, self);
                out.push(c);
            }
        }
        flush(&mut run, &mut out, self);
        out.replace(&self.root, "<model-root>")
    }

    fn value(&mut self, key: &str, v: &Json) -> Json {
        let placeholder = |p: &str| Json::String(p.to_string());
        match v {
            Json::Null => Json::Null,
            _ if TIMES.contains(&key) => placeholder("<time>"),
            _ if HOST.contains(&key) => placeholder("<host>"),
            Json::Number(n) if n.is_f64() && key.ends_with("_ms") => placeholder("<float>"),
            Json::String(s) if key == "path" && s.starts_with("/dev/shm/memcoord-") => {
                placeholder("<shm-file>")
            }
            Json::String(s) => Json::String(self.text(s)),
            Json::Array(a) => Json::Array(a.iter().map(|x| self.value(key, x)).collect()),
            Json::Object(o) => Json::Object(
                o.iter()
                    .map(|(k, x)| (k.clone(), self.value(k, x)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// The script: (action, data). Ids of earlier answers are named `$A<n>` (the n-th allocation
/// id seen), `$T<n>` (transfers) and `$L<n>` (leases), filled in when the request is sent.
fn script() -> Vec<(&'static str, Value)> {
    vec![
        ("memory.list_devices", json!(null)),
        ("memory.get_usage", json!({"device_id": "cpu"})),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 4096, "purpose": "latents"}),
        ),
        (
            "memory.allocate",
            json!({"device_id": "shm", "size_bytes": 1_000_000, "allocation_type": "Cache",
                   "alignment": 4096, "persistent": true}),
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 8192, "allocation_type": 6}),
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 128_u64 << 20, "timeout_seconds": 0}),
        ),
        (
            "memory.allocate",
            json!({"device_id": "gpu", "size_bytes": 1}),
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": "4096"}),
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 0}),
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 64, "alignment": 3}),
        ),
        (
            "memory.get_status",
            json!({"device_id": "cpu", "include_fragmentation": true}),
        ),
        (
            "memory.get_allocations",
            json!({"device_id": "shm", "limit": 10}),
        ),
        (
            "memory.transfer",
            json!({"allocation_id": "$A1", "source_device_id": "cpu",
                   "destination_device_id": "shm", "mode": "copy", "wait_for_completion": true}),
        ),
        ("memory.get_transfer", json!({"transfer_id": "$T1"})),
        (
            "memory.transfer",
            json!({"allocation_id": "$A1", "source_device_id": "cpu",
                   "destination_device_id": "cpu"}),
        ),
        (
            "memory.transfer",
            json!({"allocation_id": "$A3", "source_device_id": "cpu",
                   "destination_device_id": "shm"}),
        ),
        (
            "memory.get_transfer",
            json!({"transfer_id": "00000000-0000-4000-8000-000000000000"}),
        ),
        ("memory.deallocate", json!({"allocation_id": "$A1"})),
        ("memory.deallocate", json!({"allocation_id": "$A1"})),
        ("memory.deallocate", json!({"allocation_id": "not-an-id"})),
        ("memory.defragment", json!({"device_id": "shm"})),
        (
            "memory.optimize",
            json!({"device_id": "cpu", "optimization_type": "ClearCache"}),
        ),
        (
            "memory.model_load",
            json!({"model_name": "m", "path": "m.safetensors", "device_id": "cpu"}),
        ),
        (
            "memory.model_load",
            json!({"model_name": "x", "path": "../outside.safetensors", "device_id": "cpu"}),
        ),
        ("memory.model_status", json!({"device_id": "cpu"})),
        ("memory.model_acquire", json!({"model_name": "m"})),
        ("memory.model_unload", json!({"model_name": "m"})),
        ("memory.model_renew", json!({"lease_id": "$L1"})),
        (
            "memory.model_renew",
            json!({"lease_id": "$L1", "ttl_seconds": 0}),
        ),
        (
            "memory.model_renew",
            json!({"lease_id": "$L1", "ttl_seconds": 120}),
        ),
        ("memory.model_release", json!({"lease_id": "$L1"})),
        ("memory.model_release", json!({"lease_id": "$L1"})),
        (
            "memory.model_renew",
            json!({"lease_id": "$L1", "ttl_seconds": 120}),
        ),
        (
            "memory.model_optimize",
            json!({"strategy": "UnloadIdle", "idle_seconds": 0}),
        ),
        ("memory.model_status", json!({"model_name": "m"})),
        ("memory.get_pressure", json!({"device_id": "shm"})),
        (
            "memory.analytics",
            json!({"device_id": "cpu", "window_seconds": 60}),
        ),
        ("memory.optimization_recs", json!({"device_id": "cpu"})),
        ("memory.clear", json!({"device_id": "shm"})),
        ("memory.clear", json!({"device_id": "shm", "force": true})),
        ("memory.no_such_action", json!({})),
        ("memory.get_usage", json!([1, 2])),
    ]
}

fn fill(v: &Value, seen: &HashMap<char, Vec<String>>) -> Value {
    match v {
        Value::String(s) if s.starts_with('$') && s.len() >= 3 => {
            let kind = s.as_bytes()[1] as char;
            let n: usize = s[2..].parse().unwrap();
            Value::String(seen[&kind][n - 1].clone())
        }
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), fill(v, seen))).collect())
        }
        other => other.clone(),
    }
}

fn note_ids(v: &Value, seen: &mut HashMap<char, Vec<String>>) {
    let d = &v["data"];
    let mut add = |kind: char, id: &Value| {
        if let Some(id) = id.as_str() {
            let list = seen.entry(kind).or_default();
            if !list.iter().any(|x| x == id) {
                list.push(id.to_string());
            }
        }
    };
    add('A', &d["allocation"]["allocation_id"]);
    add('T', &d["transfer_id"]);
    add('L', &d["lease_id"]);
}

#[test]
fn the_wire_format_is_what_it_was() {
    let root = std::env::temp_dir().join(format!("memcoord-golden-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    common::write_model(&root.join("m.safetensors"), &[("w", 1000), ("b", 10)]);
    // Its own child, not `common::Worker`: the answers are needed as the bytes that came.
    let mut child = std::process::Command::new(common::BIN)
        .args([
            "worker",
            "--no-gpu",
            "--budget",
            "cpu=64MiB",
            "--budget",
            "shm=64MiB",
        ])
        .arg("--model-root")
        .arg(&root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen: HashMap<char, Vec<String>> = HashMap::new();
    let mut norm = Normalizer {
        ids: HashMap::new(),
        root: root.display().to_string(),
    };
    let mut lines = Vec::new();
    for (i, (action, data)) in script().into_iter().enumerate() {
        let request_id = format!("golden-{i}");
        let data = fill(&data, &seen);
        let line = json!({"request_id": request_id, "action": action, "data": data}).to_string();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        // One request at a time, each answered before the next is sent: the next line is its.
        let mut answer = String::new();
        stdout.read_line(&mut answer).unwrap();
        let answer = answer.trim_end().to_string();
        note_ids(&serde_json::from_str(&answer).unwrap(), &mut seen);
        let ordered: Json = serde_json::from_str(&answer).unwrap();
        let mut out = format!("{action} ");
        norm.value("", &ordered).write(&mut out);
        lines.push(out);
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&root);
    let got = lines.join("\n") + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/wire.jsonl");
    if std::env::var_os("MEMCOORD_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
        println!("wrote {}", path.display());
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap();
    for (n, (g, w)) in got.lines().zip(want.lines()).enumerate() {
        assert_eq!(g, w, "answer {n} differs from tests/golden/wire.jsonl");
    }
    assert_eq!(got.lines().count(), want.lines().count());
}
