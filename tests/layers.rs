//! The layering rules of docs/architecture.md, checked on the sources: nothing under
//! `src/backends`, `src/managers` or `src/domain` names the wire module or `serde_json`, and
//! nothing at or below the service (`src/service`, `src/managers`, `src/backends`,
//! `src/domain`, `src/protocol`) names a layer above it (`api`, `dispatch`, `transport`).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every line of the `.rs` files under `src/<dir>` (for each of `dirs`) that mentions one of
/// `names`, as `file:line: text`.
fn mentions(dirs: &[&str], names: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for dir in dirs {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 10, "found only {files:?}");
    let mut offences = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if names.iter().any(|name| line.contains(name)) {
                offences.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    offences
}

#[test]
fn below_the_service_nothing_speaks_the_wire() {
    let offences = mentions(
        &["backends", "managers", "domain"],
        &["crate::protocol", "serde_json"],
    );
    assert!(
        offences.is_empty(),
        "the wire below the service:\n{}",
        offences.join("\n")
    );
}

#[test]
fn data_flows_one_way_nothing_below_the_api_imports_from_above() {
    let offences = mentions(
        &["service", "managers", "backends", "domain", "protocol"],
        &["crate::api", "crate::dispatch", "crate::transport"],
    );
    assert!(
        offences.is_empty(),
        "an upward import (transport → dispatch → api → service → managers → backends):\n{}",
        offences.join("\n")
    );
}
