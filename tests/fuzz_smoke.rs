//! A short, bounded fuzz run of the request decoder and the dispatcher on the stable toolchain,
//! without cargo-fuzz (docs/reliability.md, "Fuzzing"). The oracles are those of the cargo-fuzz
//! targets: the same file, `fuzz/src/harness.rs`, is compiled in here.
//!
//! Inputs come from a fixed-seed xorshift generator: (a) random bytes, (b) mutations (byte
//! flips, insertions, deletions, truncations, splices, dictionary tokens, duplicated keys, a
//! field's value swapped for another) of the seed corpus `fuzz/corpus/dispatch/seed-*` (valid
//! request lines for every action), and (c) hand-written nasty lines. Each test runs for a
//! bounded time (`MEMCOORD_FUZZ_SECS` scales it) and prints its seed and how many inputs ran;
//! `MEMCOORD_FUZZ_SEED=N` replays another seed. A failing input is printed as a Rust byte
//! string before the test fails.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

#[path = "../fuzz/src/harness.rs"]
#[allow(dead_code)] // `global` serves the cargo-fuzz targets only.
mod harness;

use serde_json::{Value, json};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

const DEFAULT_SEED: u64 = 0x6d65_6d63_6f6f_7264; // "memcoord"

fn seed() -> u64 {
    std::env::var("MEMCOORD_FUZZ_SEED")
        .ok()
        .and_then(|s| {
            s.strip_prefix("0x")
                .map_or_else(|| s.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
        })
        .unwrap_or(DEFAULT_SEED)
}

/// Seconds of the run: `base` scaled by `MEMCOORD_FUZZ_SECS` / 10 when it is set.
fn budget(base: f64) -> Duration {
    let scale = std::env::var("MEMCOORD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(1.0, |s| s / 10.0);
    Duration::from_secs_f64(base * scale)
}

/// xorshift64*: repeatable from its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn fuzz_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz"))
}

/// The seed corpus: inputs of one or more valid request lines.
fn seeds() -> Vec<Vec<u8>> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(fuzz_dir().join("corpus/dispatch"))
        .expect("fuzz/corpus/dispatch")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("seed-"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(out.len() >= 20, "the seed corpus is missing");
    out.into_iter().map(|(_, b)| b).collect()
}

/// The inputs kept in `fuzz/artifacts/<target>/` (past findings), but those named `open-*`.
fn artifacts(target: &str) -> Vec<Vec<u8>> {
    let Ok(dir) = std::fs::read_dir(fuzz_dir().join("artifacts").join(target)) else {
        return Vec::new();
    };
    let mut files: Vec<_> = dir
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            !name.starts_with("open-") && !name.ends_with(".md") && e.path().is_file()
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// The tokens of `fuzz/dict/protocol.dict` (libFuzzer's format: `name="value"`, with `\\`,
/// `\"` and `\xAB` escapes).
fn dictionary() -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(fuzz_dir().join("dict/protocol.dict")).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(start) = line.find('"') else {
            continue;
        };
        if line.starts_with('#') {
            continue;
        }
        let body = &line.as_bytes()[start + 1..line.len() - 1];
        let mut v = Vec::new();
        let mut i = 0;
        while i < body.len() {
            if body[i] == b'\\' && i + 1 < body.len() {
                if body[i + 1] == b'x' && i + 3 < body.len() {
                    let hex = std::str::from_utf8(&body[i + 2..i + 4]).unwrap();
                    v.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 4;
                } else {
                    v.push(body[i + 1]);
                    i += 2;
                }
            } else {
                v.push(body[i]);
                i += 1;
            }
        }
        out.push(v);
    }
    assert!(out.len() > 50, "the dictionary is missing");
    // The harness's concurrency markers (`&`, `~`) stay out of the smoke run: with them, what
    // an input does depends on timing, and this run is to be repeatable from its seed.
    out.retain(|t| !t.contains(&b'&') && !t.contains(&b'~'));
    out
}

/// JSON values worth putting into any field.
fn odd_values() -> Vec<Value> {
    vec![
        json!(null),
        json!(true),
        json!(0),
        json!(-1),
        json!(1),
        json!(-0.0),
        json!(0.5),
        json!(3600),
        json!(3600.000001),
        json!(64),
        json!(4096),
        json!(1 << 20),
        json!(16 << 20),
        json!(64 << 20),
        json!((64 << 20) + 1),
        json!(1u64 << 30),
        json!(1u64 << 31),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(1e308),
        json!(5e-324),
        json!(""),
        json!("cpu"),
        json!("shm"),
        json!("cuda:0"),
        json!("CPU"),
        json!("$A0"),
        json!("$U1"),
        json!("$L0"),
        json!("$T0"),
        json!("Reservation"),
        json!("reservation"),
        json!("Full"),
        json!("copy"),
        json!("FitBudget"),
        json!("tiny.safetensors"),
        json!("big.safetensors"),
        json!("../etc/passwd"),
        json!("/etc/passwd"),
        json!("\u{0}"),
        json!("é😀\u{202e}"),
        json!("x".repeat(300)),
        json!([]),
        json!(["$A0", "$A1", "nope"]),
        json!({}),
        json!({"a": [1, {"b": null}]}),
    ]
}

/// One mutation of `input`.
fn mutate(rng: &mut Rng, input: &[u8], seeds: &[Vec<u8>], dict: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    match rng.below(10) {
        // Flip bits.
        0 => {
            for _ in 0..=rng.below(4) {
                if !v.is_empty() {
                    let i = rng.below(v.len());
                    v[i] ^= 1 << rng.below(8);
                }
            }
        }
        // A random byte in, or a range out.
        1 => {
            let i = rng.below(v.len() + 1);
            v.insert(i, rng.next() as u8);
        }
        2 if !v.is_empty() => {
            let i = rng.below(v.len());
            let n = 1 + rng.below(16).min(v.len() - i - 1);
            v.drain(i..(i + n).min(v.len()));
        }
        // Truncate.
        3 => v.truncate(rng.below(v.len() + 1)),
        // Splice: a prefix of this one and a suffix of another.
        4 => {
            let other = rng.pick(seeds);
            let cut = rng.below(v.len() + 1);
            let from = rng.below(other.len() + 1);
            v.truncate(cut);
            v.extend_from_slice(&other[from..]);
        }
        // A dictionary token in, or in place of a range.
        5 | 6 => {
            let t = rng.pick(dict);
            let i = rng.below(v.len() + 1);
            let n = if rng.chance(2) {
                0
            } else {
                rng.below(8).min(v.len() - i)
            };
            v.splice(i..i + n, t.iter().copied());
        }
        // Field swaps, on a line that is JSON.
        _ => {
            let lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
            let k = rng.below(lines.len());
            let Ok(mut line) = serde_json::from_slice::<Value>(lines[k]) else {
                return v;
            };
            let odd = odd_values();
            match rng.below(4) {
                // A data field gets an odd value.
                0 | 1 => {
                    if let Some(d) = line.get_mut("data").and_then(Value::as_object_mut)
                        && !d.is_empty()
                    {
                        let key = d.keys().nth(rng.below(d.len())).unwrap().clone();
                        d[&key] = rng.pick(&odd).clone();
                    } else if let Some(o) = line.as_object_mut() {
                        o.insert("data".into(), rng.pick(&odd).clone());
                    }
                }
                // An envelope field gets an odd value.
                2 => {
                    if let Some(o) = line.as_object_mut() {
                        let key = *rng.pick(&["request_id", "action", "data"]);
                        o.insert(key.into(), rng.pick(&odd).clone());
                    }
                }
                // Another action with the same data.
                _ => {
                    if let Some(o) = line.as_object_mut() {
                        o.insert("action".into(), json!(rng.pick(&harness::ACTIONS)));
                    }
                }
            }
            let mut text = line.to_string().into_bytes();
            // Sometimes, a key twice.
            if rng.chance(6) {
                let dup: &[u8] = rng.pick::<&[u8]>(&[
                    b"\"request_id\":\"dup\",",
                    b"\"device_id\":\"shm\",",
                    b"\"size_bytes\":1,",
                    b"\"action\":\"memory.clear\",",
                ]);
                let at = text.iter().rposition(|&b| b == b'{').unwrap_or(0) + 1;
                text.splice(at..at, dup.iter().copied());
            }
            let mut out = Vec::new();
            for (j, l) in lines.iter().enumerate() {
                if j > 0 {
                    out.push(b'\n');
                }
                out.extend_from_slice(if j == k { &text } else { l });
            }
            return out;
        }
    }
    v
}

/// Random bytes: sometimes any byte, sometimes JSON's alphabet.
fn random_bytes(rng: &mut Rng) -> Vec<u8> {
    const JSONISH: &[u8] = b"{}[]\":,0123456789-+.eE truenfalsl\\u\n\r\t";
    let len = rng.below(200);
    let any = rng.chance(2);
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            if any {
                rng.next() as u8
            } else {
                *rng.pick(JSONISH)
            }
        })
        .collect();
    if rng.chance(3) {
        v.insert(0, b'{');
    }
    v
}

fn line(action: &str, data: Value) -> Vec<u8> {
    json!({"request_id": "n", "action": action, "data": data})
        .to_string()
        .into_bytes()
}

/// Hand-written nasty inputs.
fn nasty() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = Vec::new();
    let raw = |s: &str| s.as_bytes().to_vec();
    // Nesting far past serde_json's limit, in the envelope and in data.
    v.push(vec![b'['; 100_000]);
    v.push(b"{\"a\":".repeat(20_000));
    let mut deep =
        raw(r#"{"request_id":"deep","action":"memory.get_usage","data":{"device_id":"cpu","x":"#);
    deep.extend(std::iter::repeat_n(b'[', 5000));
    deep.extend(std::iter::repeat_n(b']', 5000));
    deep.extend_from_slice(b"}}");
    v.push(deep);
    // Nesting as deep as a line may be (1 MiB): skipping it must not recurse.
    let mut deepest = raw(
        r#"{"request_id":"deepest","action":"memory.get_usage","data":{"device_id":"cpu","x":"#,
    );
    deepest.extend(std::iter::repeat_n(b'[', 1 << 20));
    deepest.extend(std::iter::repeat_n(b']', 1 << 20));
    deepest.extend_from_slice(b"}}");
    v.push(deepest);
    let mut unclosed = raw(r#"{"request_id":"unclosed","action":"memory.get_usage","data":{"x":"#);
    unclosed.extend(std::iter::repeat_n(b'{', 1 << 20));
    v.push(unclosed);
    let mut deep_ok =
        raw(r#"{"request_id":"deep2","action":"memory.get_usage","data":{"device_id":"cpu","x":"#);
    deep_ok.extend(std::iter::repeat_n(b'[', 100));
    deep_ok.extend(std::iter::repeat_n(b']', 100));
    deep_ok.extend_from_slice(b"}}");
    v.push(deep_ok);
    // Sizes and numbers.
    for size in [
        "0",
        "-1",
        "-0",
        "1.5",
        "1e3",
        "1e999",
        "-1e999",
        "1E2",
        "\"1GiB\"",
        "null",
        "true",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "67108864",
        "67108865",
        "67108863",
        "83886080",
        "16777216",
        "16777215",
        "00",
        "01",
        "0x10",
        "NaN",
        "Infinity",
        "-Infinity",
        "[1]",
        "{}",
    ] {
        v.push(raw(&format!(
            r#"{{"request_id":"s{size}","action":"memory.allocate","data":{{"device_id":"cpu","size_bytes":{size},"timeout_seconds":0}}}}"#
        )));
        v.push(raw(&format!(
            r#"{{"request_id":"t","action":"memory.allocate","data":{{"device_id":"shm","size_bytes":4096,"timeout_seconds":{size}}}}}"#
        )));
        v.push(raw(&format!(
            r#"{{"request_id":"g","action":"memory.get_allocations","data":{{"device_id":"shm","offset":{size},"limit":{size}}}}}"#
        )));
        v.push(raw(&format!(
            r#"{{"request_id":"w","action":"memory.analytics","data":{{"device_id":"cpu","window_seconds":{size}}}}}"#
        )));
    }
    for align in [
        "3",
        "-64",
        "1073741824",
        "2147483648",
        "4611686018427387904",
        "1",
        "2",
    ] {
        v.push(raw(&format!(
            r#"{{"request_id":"al","action":"memory.allocate","data":{{"device_id":"shm","size_bytes":4096,"alignment":{align},"timeout_seconds":0}}}}"#
        )));
    }
    // NaN-like strings and odd floats where numbers go.
    for t in [
        "\"NaN\"",
        "\"inf\"",
        "-0.0",
        "1e-320",
        "3600",
        "3600.0000000001",
        "-1e-300",
    ] {
        v.push(raw(&format!(
            r#"{{"request_id":"o","action":"memory.optimize","data":{{"device_id":"cpu","optimization_type":"ReduceToTarget","target_usage_percentage":{t},"wait_for_completion":true}}}}"#
        )));
        v.push(raw(&format!(
            r#"{{"request_id":"m","action":"memory.model_optimize","data":{{"strategy":"UnloadIdle","idle_seconds":{t}}}}}"#
        )));
        v.push(raw(&format!(
            r#"{{"request_id":"k","action":"memory.model_load","data":{{"model_name":"k","path":"tiny.safetensors","device_id":"cpu","keep_alive_seconds":{t},"timeout_seconds":0}}}}"#
        )));
    }
    // Request ids: empty, 256 and 257 bytes, 300 bytes, multibyte, escapes, NUL.
    for id in [
        String::new(),
        "x".repeat(256),
        "x".repeat(257),
        "x".repeat(300),
        "é".repeat(128),
        "é".repeat(129),
        "\\u00e9".repeat(128),
        "\\u0000".to_string(),
        "\\ud800".to_string(),
        "\\ud83d\\ude00".to_string(),
        "a\\\"b".to_string(),
        "tab\there".to_string(),
    ] {
        v.push(raw(&format!(
            r#"{{"request_id":"{id}","action":"memory.list_devices"}}"#
        )));
    }
    v.push(raw(r#"{"request_id":5,"action":"memory.list_devices"}"#));
    v.push(raw(r#"{"request_id":null,"action":"memory.list_devices"}"#));
    v.push(raw(
        r#"{"request_id":["r"],"action":"memory.list_devices"}"#,
    ));
    // Raw bytes where text goes: NUL, invalid UTF-8, a UTF-8-encoded surrogate, a BOM.
    v.push(b"{\"request_id\":\"a\0b\",\"action\":\"memory.list_devices\"}".to_vec());
    v.push(b"{\"request_id\":\"a\xffb\",\"action\":\"memory.list_devices\"}".to_vec());
    v.push(b"{\"request_id\":\"a\xed\xa0\x80b\",\"action\":\"memory.list_devices\"}".to_vec());
    v.push(b"{\"request_id\":\"r\",\"action\":\"memory.get_usage\",\"data\":{\"device_id\":\"cpu\xc0\x80\"}}".to_vec());
    v.push(b"\xef\xbb\xbf{\"request_id\":\"bom\",\"action\":\"memory.list_devices\"}".to_vec());
    v.push(b"\x0c{\"request_id\":\"ff\",\"action\":\"memory.list_devices\"}".to_vec());
    v.push(b"\0".to_vec());
    // Duplicate keys, in the envelope and in data.
    v.push(raw(
        r#"{"request_id":"a","request_id":"b","action":"memory.list_devices"}"#,
    ));
    v.push(raw(
        r#"{"request_id":"a","action":"memory.list_devices","action":"memory.clear"}"#,
    ));
    v.push(raw(
        r#"{"request_id":"a","action":"memory.get_usage","data":{"device_id":"cpu"},"data":null}"#,
    ));
    v.push(raw(r#"{"request_id":"a","action":"memory.get_usage","data":{"device_id":"cpu","device_id":"shm"}}"#));
    v.push(raw(r#"{"request_id":"a","action":"memory.allocate","data":{"device_id":"cpu","size_bytes":1,"size_bytes":2}}"#));
    // data of every other type.
    for d in [
        "[]",
        "[1]",
        "\"x\"",
        "1",
        "true",
        "false",
        "{}",
        "null",
        "{\"\":{}}",
    ] {
        for a in [
            "memory.list_devices",
            "memory.get_usage",
            "memory.get_pressure",
            "memory.nope",
        ] {
            v.push(raw(&format!(
                r#"{{"request_id":"d","action":"{a}","data":{d}}}"#
            )));
        }
    }
    // Actions that are not quite right.
    for a in [
        "",
        "memory.",
        "MEMORY.LIST_DEVICES",
        "memory.list_devices ",
        " memory.list_devices",
        "memory.compact",
        "memory.list_devices\\u0000",
        "memory\\u002elist_devices",
    ] {
        v.push(raw(&format!(r#"{{"request_id":"a","action":"{a}"}}"#)));
    }
    v.push(raw(r#"{"request_id":"a","action":null}"#));
    v.push(raw(r#"{"request_id":"a","action":{}}"#));
    // Line endings and blank lines.
    v.push(raw("{\"request_id\":\"crlf\",\"action\":\"memory.list_devices\"}\r\n{\"request_id\":\"2\",\"action\":\"memory.list_devices\"}\r\n"));
    v.push(raw(
        "{\"request_id\":\"cr\",\"action\":\"memory.list_devices\"}\r\r",
    ));
    v.push(raw(
        "{\"request_id\":\"c\",\r\"action\":\"memory.list_devices\"}",
    ));
    v.push(raw("\n\n\r\n"));
    v.push(raw(" \t "));
    v.push(raw("{}"));
    v.push(raw("null"));
    v.push(raw(
        "{\"request_id\":\"trail\",\"action\":\"memory.list_devices\"} x",
    ));
    v.push(raw(
        "{\"request_id\":\"trail\",\"action\":\"memory.list_devices\"}}",
    ));
    v.push(raw(
        "{\"request_id\":\"open\",\"action\":\"memory.list_devices\"",
    ));
    // Long strings.
    v.push(line("memory.allocate", json!({"device_id": "cpu", "size_bytes": 64, "purpose": "p".repeat(1 << 20), "timeout_seconds": 0})));
    v.push(line(
        "memory.get_usage",
        json!({"device_id": "c".repeat(100_000)}),
    ));
    v.push(line(
        "memory.model_load",
        json!({"model_name": "m".repeat(10_000), "path": "tiny.safetensors", "device_id": "cpu"}),
    ));
    // Model paths.
    for p in [
        "",
        ".",
        "..",
        "/",
        "sub",
        "sub/",
        "/etc/passwd",
        "../../../../etc/passwd",
        "escape.safetensors",
        "link.safetensors",
        "sub/../tiny.safetensors",
        "tiny.safetensors\u{0}",
        "broken.safetensors",
        "short.safetensors",
        "empty.safetensors",
        "huge.safetensors",
        "big.safetensors",
        "nope.safetensors",
        "/dev/zero",
        "/proc/self/mem",
    ] {
        v.push(line(
            "memory.model_load",
            json!({"model_name": "p", "path": p, "device_id": "shm", "timeout_seconds": 0}),
        ));
    }
    // Sequences: allocations and transfers of every kind, through the placeholders.
    let seq = |ls: &[Vec<u8>]| ls.join(&b'\n');
    v.push(seq(&[
        line("memory.allocate", json!({"device_id": "cpu", "size_bytes": 8 << 20, "allocation_type": "Reservation"})),
        line("memory.transfer", json!({"allocation_id": "$A0", "source_device_id": "cpu", "destination_device_id": "shm"})),
        line("memory.transfer", json!({"allocation_id": "$A0", "source_device_id": "cpu", "destination_device_id": "cpu"})),
        line("memory.transfer", json!({"allocation_id": "$A0", "source_device_id": "shm", "destination_device_id": "cpu"})),
        line("memory.deallocate", json!({"allocation_id": "$U0", "device_id": "shm"})),
        line("memory.deallocate", json!({"allocation_id": "$U0"})),
        line("memory.deallocate", json!({"allocation_id": "$A0"})),
    ]));
    v.push(seq(&[
        line("memory.allocate", json!({"device_id": "shm", "size_bytes": 40 << 20, "persistent": true})),
        line("memory.transfer", json!({"allocation_id": "$A0", "source_device_id": "shm", "destination_device_id": "cpu", "mode": "copy"})),
        line("memory.transfer", json!({"allocation_id": "$A0", "source_device_id": "shm", "destination_device_id": "cpu", "mode": "move"})),
        line("memory.deallocate", json!({"allocation_id": "$A0"})),
        line("memory.clear", json!({"device_id": "shm"})),
        line("memory.get_transfer", json!({"transfer_id": "$T0"})),
        line("memory.defragment", json!({"device_id": "cpu"})),
    ]));
    v.push(seq(&[
        line("memory.model_load", json!({"model_name": "a", "path": "big.safetensors", "device_id": "shm"})),
        line("memory.model_acquire", json!({"model_name": "a"})),
        line("memory.model_load", json!({"model_name": "b", "path": "big.safetensors", "device_id": "shm"})),
        line("memory.model_load", json!({"model_name": "c", "path": "big.safetensors", "device_id": "shm", "timeout_seconds": 0.2})),
        line("memory.allocate", json!({"device_id": "shm", "size_bytes": 20 << 20, "timeout_seconds": 0})),
        line("memory.model_acquire", json!({"model_name": "b", "timeout_seconds": 0})),
        line("memory.model_unload", json!({"model_name": "a"})),
        line("memory.model_release", json!({"lease_id": "$L0"})),
        line("memory.model_release", json!({"lease_id": "$L0"})),
        line("memory.deallocate", json!({"allocation_id": "$A0"})),
        line("memory.transfer", json!({"allocation_id": "$A1", "source_device_id": "shm", "destination_device_id": "cpu"})),
        line("memory.model_optimize", json!({"strategy": "FitBudget", "target_bytes": 0})),
        line("memory.optimization_recs", json!(null)),
    ]));
    v.push(seq(&[
        line(
            "memory.model_load",
            json!({"model_name": "e", "path": "empty.safetensors", "device_id": "cpu"}),
        ),
        line(
            "memory.model_load",
            json!({"model_name": "e", "path": "tiny.safetensors", "device_id": "cpu"}),
        ),
        line(
            "memory.model_load",
            json!({"model_name": "e", "path": "empty.safetensors", "device_id": "shm"}),
        ),
        line("memory.model_status", json!({"model_name": "e"})),
        line(
            "memory.model_unload",
            json!({"model_name": "e", "force": true}),
        ),
        line(
            "memory.model_unload",
            json!({"model_name": "e", "force": true}),
        ),
    ]));
    // Many allocations, then every read-out.
    let mut many: Vec<Vec<u8>> = (0..24)
        .map(|i| {
            let kind = ["General", "Cache", "Temporary", "Activations", "Staging", "Reservation"][i % 6];
            line("memory.allocate", json!({"device_id": (["cpu", "shm"][i % 2]), "size_bytes": 1 + i * 300_000, "allocation_type": kind, "persistent": i % 5 == 0, "alignment": 1 << (6 + i % 10), "timeout_seconds": 0}))
        })
        .collect();
    many.push(line("memory.deallocate", json!({"allocation_id": "$A3"})));
    many.push(line("memory.optimize", json!({"device_id": "shm", "optimization_type": "Full", "target_usage_percentage": 0, "force": true})));
    many.push(line(
        "memory.get_status",
        json!({"device_id": "cpu", "include_fragmentation": true}),
    ));
    many.push(line("memory.get_pressure", json!(null)));
    many.push(line("memory.analytics", json!({"window_seconds": 1})));
    many.push(line(
        "memory.optimization_recs",
        json!({"device_id": "shm"}),
    ));
    v.push(seq(&many));
    v
}

/// Runs `f`; if it panics, prints which case of which seed, and the input, first.
fn guarded(kind: &str, n: u64, input: &[u8], f: impl FnOnce()) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
        eprintln!(
            "fuzz_smoke: {kind} case {n} failed (MEMCOORD_FUZZ_SEED={:#x}); the input:\n{}",
            seed(),
            bytes_literal(input)
        );
        resume_unwind(p);
    }
}

fn bytes_literal(b: &[u8]) -> String {
    let mut s = String::from("b\"");
    for &c in b.iter().take(4096) {
        s.extend(std::ascii::escape_default(c).map(char::from));
    }
    s.push('"');
    if b.len() > 4096 {
        s.push_str(&format!(" (first 4096 of {} bytes)", b.len()));
    }
    s
}

#[test]
fn the_decoder_takes_any_line() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let seeds = seeds();
    let dict = dictionary();
    let mut n = 0u64;
    for input in nasty().iter().chain(&seeds).chain(&artifacts("decode")) {
        for l in input.split(|&b| b == b'\n').chain([&input[..]]) {
            guarded("decode (nasty/seed)", n, l, || harness::check_decode(l));
            n += 1;
        }
    }
    let fixed = n;
    let deadline = Instant::now() + budget(6.0);
    while Instant::now() < deadline {
        for _ in 0..256 {
            let input = if rng.chance(4) {
                random_bytes(&mut rng)
            } else {
                let mut v = rng.pick(&seeds).clone();
                for _ in 0..=rng.below(4) {
                    v = mutate(&mut rng, &v, &seeds, &dict);
                }
                v
            };
            let l = input
                .split(|&b| b == b'\n')
                .nth(rng.below(2))
                .unwrap_or(&input);
            guarded("decode", n, l, || harness::check_decode(l));
            n += 1;
        }
    }
    println!(
        "fuzz_smoke decode: seed {seed:#x}, {n} lines ({fixed} nasty and seed lines, {} generated), no failure",
        n - fixed
    );
}

#[test]
fn the_dispatcher_answers_any_input_and_keeps_its_books() {
    let seed = seed();
    let mut rng = Rng::new(seed ^ 0xd15c);
    let seeds = seeds();
    let dict = dictionary();
    let h = harness::Harness::new();
    let started = Instant::now();
    let (mut nasty_n, mut seed_n, mut random_n, mut mutated_n) = (0u64, 0u64, 0u64, 0u64);
    let mut n = 0u64;
    for input in nasty() {
        guarded("dispatch (nasty)", n, &input, || h.run_input(&input));
        n += 1;
        nasty_n += 1;
    }
    for input in &seeds {
        guarded("dispatch (seed)", n, input, || h.run_input(input));
        n += 1;
        seed_n += 1;
    }
    // Every finding kept in fuzz/artifacts/dispatch stays fixed (one still open is named
    // `open-*` there, and skipped).
    let mut findings = 0;
    for input in artifacts("dispatch") {
        guarded("dispatch (finding)", n, &input, || h.run_input(&input));
        n += 1;
        findings += 1;
    }
    let deadline = started + budget(18.0);
    while Instant::now() < deadline {
        let input = if rng.chance(5) {
            random_n += 1;
            random_bytes(&mut rng)
        } else {
            mutated_n += 1;
            // One to three seed inputs one after the other, then mutated.
            let mut v = rng.pick(&seeds).clone();
            for _ in 0..rng.below(3) {
                let extra = rng.pick(&seeds[..]).clone();
                v.extend_from_slice(&extra);
            }
            for _ in 0..=rng.below(3) {
                v = mutate(&mut rng, &v, &seeds, &dict);
            }
            v
        };
        guarded("dispatch", n, &input, || h.run_input(&input));
        n += 1;
    }
    let s = &h.stats;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "fuzz_smoke dispatch: seed {seed:#x}, {n} inputs ({nasty_n} nasty, {seed_n} seeds, {findings} past findings, {random_n} random, {mutated_n} mutated), {} lines, {} answered with success, {} pending, {} refused TOO_MANY_REQUESTS, room made {} times, in {:.1} s; no failure",
        get(&s.lines),
        get(&s.successes),
        get(&s.pending),
        get(&s.refused_in_flight),
        get(&s.reliefs),
        started.elapsed().as_secs_f64()
    );
}
