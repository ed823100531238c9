//! Stdio benchmarks of `memcoord worker`, each side by side with its baseline in one run:
//!
//! 1. pipelined throughput of `memory.get_usage` vs a plain Python stdio worker
//!    (clients/python/baseline_worker.py) doing the same work;
//! 2. one request at a time, `allocate` + `deallocate` of 4 KiB on cpu, vs the same exchange
//!    echoed by `cat` over the same kind of pipes (the floor: two pipe round trips).
//!
//! Run: `cargo bench --bench stdio` (options: `-- --requests N --pairs N --json`).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_memcoord");

fn spawn(cmd: &mut Command) -> (Child, ChildStdin, ChildStdout) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    (child, stdin, stdout)
}

fn memcoord() -> Command {
    let mut c = Command::new(BIN);
    c.args(["worker", "--budget", "cpu=1GiB", "--budget", "shm=64MiB"]);
    c
}

fn python_baseline() -> Command {
    let mut c = Command::new("python3");
    c.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/python/baseline_worker.py"
    ));
    c
}

/// Writes `n` get_usage requests as fast as the pipe takes them while another thread counts
/// response lines; returns requests per second (first write to last response).
fn pipelined(cmd: &mut Command, n: usize) -> f64 {
    let mut input = Vec::with_capacity(n * 90);
    for i in 0..n {
        writeln!(
            input,
            r#"{{"request_id":"r{i}","action":"memory.get_usage","data":{{"device_id":"cpu"}}}}"#
        )
        .unwrap();
    }
    let (mut child, mut stdin, stdout) = spawn(cmd);
    // Let the process start before the clock does.
    std::thread::sleep(Duration::from_millis(300));
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::with_capacity(1 << 20, stdout);
        let mut buf = Vec::new();
        let mut count = 0;
        let mut ok = 0;
        while count < n {
            buf.clear();
            if r.read_until(b'\n', &mut buf).unwrap() == 0 {
                break;
            }
            count += 1;
            let head = &buf[..buf.len().min(20)];
            if head.starts_with(b"{\"success\":true") || head.starts_with(b"{\"success\": true") {
                ok += 1;
            }
        }
        (Instant::now(), count, ok)
    });
    let start = Instant::now();
    stdin.write_all(&input).unwrap();
    stdin.flush().unwrap();
    drop(stdin);
    let (end, count, ok) = reader.join().unwrap();
    assert_eq!(count, n, "every request answered");
    assert_eq!(ok, n, "every request succeeded");
    let _ = child.wait();
    n as f64 / (end - start).as_secs_f64()
}

/// One request at a time: allocate 4 KiB on cpu, then deallocate it. Returns pair times in µs.
fn pairs(cmd: &mut Command, n: usize, echo: bool) -> Vec<f64> {
    let (mut child, mut stdin, stdout) = spawn(cmd);
    let mut r = BufReader::new(stdout);
    let mut line = String::new();
    let mut times = Vec::with_capacity(n);
    let fixed_id = "00000000-0000-4000-8000-000000000000".to_string();
    for i in 0..n + n / 10 {
        let t = Instant::now();
        writeln!(
            stdin,
            r#"{{"request_id":"a{i}","action":"memory.allocate","data":{{"device_id":"cpu","size_bytes":4096}}}}"#
        )
        .unwrap();
        stdin.flush().unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        let id = if echo {
            fixed_id.clone()
        } else {
            let at = line.find("\"allocation_id\":\"").expect("allocation id") + 17;
            line[at..at + 36].to_string()
        };
        writeln!(
            stdin,
            r#"{{"request_id":"d{i}","action":"memory.deallocate","data":{{"allocation_id":"{id}"}}}}"#
        )
        .unwrap();
        stdin.flush().unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        if !echo {
            assert!(line.contains("\"freed_bytes\":4096"), "{line}");
        }
        // The first tenth warms up.
        if i >= n / 10 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(stdin);
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    let _ = child.wait();
    times
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let requests = arg("--requests", 500_000);
    let pair_count = arg("--pairs", 20_000);

    println!("== pipelined memory.get_usage, {requests} requests ==");
    let mem = pipelined(&mut memcoord(), requests);
    let py = pipelined(&mut python_baseline(), requests);
    println!("memcoord worker        {mem:>12.0} req/s");
    println!("python baseline worker {py:>12.0} req/s");
    println!("ratio                  {:>12.1}x", mem / py);

    println!("== one at a time: allocate + deallocate 4 KiB on cpu, {pair_count} pairs ==");
    let mut m = pairs(&mut memcoord(), pair_count, false);
    let mut c = pairs(&mut Command::new("cat"), pair_count, true);
    m.sort_by(f64::total_cmp);
    c.sort_by(f64::total_cmp);
    let (m50, c50) = (percentile(&m, 0.5), percentile(&c, 0.5));
    println!(
        "memcoord pair  p50 {:>8.1} µs  p90 {:>8.1} µs  p99 {:>8.1} µs",
        m50,
        percentile(&m, 0.9),
        percentile(&m, 0.99)
    );
    println!(
        "cat echo floor p50 {:>8.1} µs  p90 {:>8.1} µs  p99 {:>8.1} µs",
        c50,
        percentile(&c, 0.9),
        percentile(&c, 0.99)
    );
    println!("memcoord above floor (p50): {:>6.1} µs", m50 - c50);
}
