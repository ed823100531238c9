//! The claimants printed in docs/protocol.md (section 13.2), taken from the page as they are and
//! run as processes of their own against an in-process worker: the Python one (`socket.recv_fds`)
//! and the C one (`recvmsg`, the segments mapped back to back with `MAP_FIXED`). The export is a
//! model placed in the holes of a fragmented `shm`, so that it has several segments. Where
//! `python3` (3.9 or later) or `cc` is missing, the test says SKIPPED.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // test code: recvmsg and memory maps of its own (tests/common/claim.rs)

mod common;
use common::Scratch;

use common::claim::{Mapped, claim_export};
use common::inproc::InProcessWorker;
use common::{Allocate, Deallocate, GetUsage, ModelAcquire, ModelLoad, Requests, write_model};
use memcoord::api::actions::export::Export;
use memcoord::protocol::ExportInfo;
use serde_json::json;
use std::path::Path;
use std::process::Command;

/// The code block that follows `<!-- name -->` in docs/protocol.md.
fn block_from_docs(name: &str) -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
    let marker = format!("<!-- {name} -->");
    let after = &doc[doc
        .find(&marker)
        .unwrap_or_else(|| panic!("{marker} not in the docs"))..];
    let start = after.find("```").unwrap();
    let body = &after[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("\n```").unwrap()].to_string()
}

/// A worker whose `shm` budget is full but for holes of 5 MiB between allocations, with a model
/// of five 4 MiB tensors loaded into them and leased; returns the worker, the lease and the model
/// file's tensor bytes in file order. A model is placed as one region where a free range holds
/// it; here none does (the arena's range beyond the budget is 16 MiB), so its tensors go into the
/// holes one by one and its export has several segments.
fn fragmented_model(root: &Path) -> (InProcessWorker, String, Vec<u8>) {
    let names = ["t0", "t1", "t2", "t3", "t4"];
    let tensors: Vec<(&str, usize)> = names.iter().map(|n| (*n, 1 << 20)).collect();
    let bytes = write_model(&root.join("m.safetensors"), &tensors);
    let dir = root.to_path_buf();
    let mut w =
        InProcessWorker::on_clock_of_the_machine("64MiB", "64MiB", |s| s.with_model_root(dir));
    let made: Vec<String> = (0..12)
        .map(|_| {
            w.send::<Allocate>(
                json!({"device_id": "shm", "size_bytes": 5 << 20, "alignment": 4096}),
            )
            .unwrap()
            .allocation
            .allocation_id
        })
        .collect();
    let usage = w.send::<GetUsage>(json!({"device_id": "shm"})).unwrap();
    let rest = usage.budget_bytes - usage.allocated_bytes - usage.reservation_bytes;
    w.send::<Allocate>(json!({"device_id": "shm", "size_bytes": rest}))
        .unwrap();
    for id in made.iter().step_by(2) {
        w.send::<Deallocate>(json!({"allocation_id": id})).unwrap();
    }
    w.send::<ModelLoad>(json!({"model_name": "m", "path": "m.safetensors", "device_id": "shm"}))
        .unwrap();
    let lease = w
        .send::<ModelAcquire>(json!({"model_name": "m"}))
        .unwrap()
        .lease_id;
    let in_order: Vec<u8> = names.iter().flat_map(|n| bytes[*n].clone()).collect();
    (w, lease, in_order)
}

fn export(w: &mut InProcessWorker, lease: &str) -> ExportInfo {
    w.send::<Export>(json!({"model_name": "m", "lease_id": lease}))
        .unwrap()
}

const PYTHON_DRIVER: &str = r#"
import json, sys
from claimant import claim, map_segments, view
export = json.load(open(sys.argv[1]))
answer, fds = claim(export)
print("segments", len(answer["segments"]))
maps = map_segments(answer, fds)
with open(sys.argv[2], "wb") as out:
    for t in export["tensors"]:
        out.write(bytes(view(maps, t["offset"], t["size_bytes"])))
try:
    claim(export)
    sys.exit("a second claim was not refused")
except LookupError as e:
    print("second claim:", e)
"#;

#[test]
fn the_python_claimant_of_the_docs_reads_every_tensor_from_another_process() {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import sys, socket; sys.exit(0 if hasattr(socket, 'recv_fds') else 1)",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED: no python3 with socket.recv_fds (3.9 or later)");
        return;
    }
    let dir = Scratch::new("py");
    let (mut w, lease, expected) = fragmented_model(&dir.0);
    let info = export(&mut w, &lease);
    std::fs::write(dir.0.join("claimant.py"), block_from_docs("claimant.py")).unwrap();
    std::fs::write(dir.0.join("driver.py"), PYTHON_DRIVER).unwrap();
    std::fs::write(
        dir.0.join("export.json"),
        serde_json::to_string(&info).unwrap(),
    )
    .unwrap();
    let out = Command::new("python3")
        .arg(dir.0.join("driver.py"))
        .arg(dir.0.join("export.json"))
        .arg(dir.0.join("tensors.bin"))
        .current_dir(&dir.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    assert!(
        stdout.contains("second claim: EXPORT_NOT_FOUND"),
        "{stdout}"
    );
    let segments: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("segments "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        segments > 1,
        "the test wants several segments, got {segments}"
    );
    let got = std::fs::read(dir.0.join("tensors.bin")).unwrap();
    assert!(
        got == expected,
        "the tensors read in Python differ from the file's"
    );
}

#[test]
fn the_c_claimant_of_the_docs_maps_the_segments_back_to_back() {
    let dir = Scratch::new("c");
    std::fs::write(dir.0.join("claim.c"), block_from_docs("claim.c")).unwrap();
    let built = Command::new("cc")
        .args(["-O2", "-Wall", "-Werror", "-o"])
        .arg(dir.0.join("claim"))
        .arg(dir.0.join("claim.c"))
        .output();
    match &built {
        Err(e) => {
            println!("SKIPPED: no C compiler (cc: {e})");
            return;
        }
        Ok(o) => assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr)),
    }
    let (mut w, lease, _) = fragmented_model(&dir.0);
    // What the C program must see: the same range, claimed here through another export.
    let mine = export(&mut w, &lease);
    let c = claim_export(&mine);
    assert!(c.fds.len() > 1, "the test wants several segments");
    let m = Mapped::new(&c);
    let checksum = m
        .bytes()
        .iter()
        .fold(0u64, |s, &b| s.wrapping_mul(31).wrapping_add(u64::from(b)));

    let theirs = export(&mut w, &lease);
    let run = |info: &ExportInfo| {
        Command::new(dir.0.join("claim"))
            .args([&info.socket_path, &info.export_id, &info.secret])
            .output()
            .unwrap()
    };
    let out = run(&theirs);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    let line: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(line["size_bytes"], json!(theirs.size_bytes));
    let expected = format!(
        "mapped {} bytes in {} segments, checksum {checksum:x}",
        theirs.size_bytes,
        c.fds.len()
    );
    assert_eq!(stdout.lines().nth(1), Some(expected.as_str()), "{stdout}");
    // Refused: the line, exit status 1, and nothing mapped.
    let again = run(&theirs);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stdout).contains("EXPORT_NOT_FOUND"));
}
