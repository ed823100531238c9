//! A host that stops reading stdout while it writes requests (issue 19, item 6): the worker must
//! not buffer every answer. It holds a bounded backlog of unread answers and then stops reading
//! stdin until the host reads; every request is still answered exactly once.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::BIN;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Requests the host writes without reading: `memory.get_allocations` of a device holding
/// [`ALLOCATIONS`] allocations, each answer about 60 KB, so 300 MB of answers in all.
/// Requests the host writes without reading: `memory.get_allocations` of a device holding
/// [`ALLOCATIONS`] allocations, each answer about 60 KB, so about 90 MB of answers in all. Each
/// request carries 1 KB of padding (an unknown field, ignored), so that the requests are more
/// than the pipe and the worker's read buffer hold: a worker that stops reading holds the
/// host's writes back.
const REQUESTS: usize = 1_500;
const ALLOCATIONS: usize = 200;
/// One request in this many is a `memory.defragment`, answered later from the runtime (a
/// pending request), so that both kinds of answer wait in the backlog.
const PENDING_EVERY: usize = 50;

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name's closing parenthesis: fields 3.. ; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_host_that_does_not_read_stdout_does_not_grow_the_worker() {
    let mut child = Command::new(BIN)
        .args([
            "worker",
            "--no-gpu",
            "--budget",
            "cpu=64MiB",
            "--budget",
            "shm=64MiB",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());

    // Allocations for the answers to list; then the RSS from here on is the baseline.
    let mut setup = String::new();
    for i in 0..ALLOCATIONS {
        setup.push_str(&format!(
            r#"{{"request_id":"a{i}","action":"memory.allocate","data":{{"device_id":"cpu","size_bytes":4096,"purpose":"backlog {i}"}}}}"#
        ));
        setup.push('\n');
    }
    stdin.write_all(setup.as_bytes()).unwrap();
    let mut line = String::new();
    for _ in 0..ALLOCATIONS {
        line.clear();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("{\"success\":true"), "{line}");
    }
    let start_kib = vm_rss_kib(pid);

    // The host writes every request and reads nothing for a while.
    let pad = "p".repeat(1000);
    let writer = std::thread::spawn(move || {
        let mut batch = Vec::with_capacity(1 << 20);
        for i in 0..REQUESTS {
            let action = if i % PENDING_EVERY == 0 {
                "memory.defragment"
            } else {
                "memory.get_allocations"
            };
            writeln!(
                batch,
                r#"{{"request_id":"r{i}","action":"{action}","data":{{"device_id":"cpu"}},"pad":"{pad}"}}"#
            )
            .unwrap();
            if batch.len() >= 64 << 10 {
                stdin.write_all(&batch).unwrap();
                batch.clear();
            }
        }
        stdin.write_all(&batch).unwrap();
        stdin
    });
    // Wait until the worker is idle: it has answered everything (no backpressure) or it is
    // waiting for the host to read. Idle: under 3 ticks (30 ms) of CPU in a second.
    let t0 = Instant::now();
    let mut peak_kib = start_kib;
    let mut last = (Instant::now(), cpu_ticks(pid));
    while t0.elapsed() < Duration::from_secs(60) {
        peak_kib = peak_kib.max(vm_rss_kib(pid));
        std::thread::sleep(Duration::from_millis(20));
        if last.0.elapsed() >= Duration::from_secs(1) {
            let ticks = cpu_ticks(pid);
            if ticks - last.1 < 3 {
                break;
            }
            last = (Instant::now(), ticks);
        }
    }
    peak_kib = peak_kib.max(vm_rss_kib(pid));
    let held_back = !writer.is_finished();
    let grew_mib = peak_kib.saturating_sub(start_kib) / 1024;
    println!(
        "RSS at start {} MiB, peak while stdout was not read {} MiB (+{grew_mib} MiB); after \
         {:.1} s the worker was idle and the host's writes {}",
        start_kib / 1024,
        peak_kib / 1024,
        t0.elapsed().as_secs_f64(),
        if held_back {
            "were held back"
        } else {
            "had all gone through"
        },
    );

    // Now read everything: every request is answered exactly once, and every answer is whole
    // (each hundredth is parsed in full; the others are checked by their ends, which is
    // cheaper than parsing 300 MB of JSON in a debug build).
    let reader = std::thread::spawn(move || {
        let mut answers: HashMap<String, u32> = HashMap::new();
        let mut line = String::new();
        let mut failures = Vec::new();
        for n in 0.. {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                return (answers, failures);
            }
            if n % 100 == 0 {
                common::check_envelope(&serde_json::from_str(&line).unwrap());
            }
            let whole = line.starts_with("{\"success\":true,\"request_id\":\"")
                && line.ends_with("\"status_code\":200}\n");
            if !whole && failures.len() < 5 {
                failures.push(line.chars().take(300).collect::<String>());
            }
            let id = line
                .get(30..)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("")
                .to_string();
            *answers.entry(id).or_default() += 1;
        }
        unreachable!()
    });
    let stdin = writer.join().unwrap();
    drop(stdin);
    let (answers, failures) = reader.join().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(failures.is_empty(), "failed answers: {failures:?}");
    assert_eq!(answers.len(), REQUESTS, "every request answered");
    for i in 0..REQUESTS {
        assert_eq!(answers.get(&format!("r{i}")), Some(&1), "r{i}");
    }
    assert!(
        grew_mib < 48,
        "the worker grew by {grew_mib} MiB holding answers nobody read"
    );
    assert!(
        held_back,
        "the worker read every request while its answers were not read"
    );
    println!(
        "all {REQUESTS} answered once in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
