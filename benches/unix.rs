//! The Unix socket (`--unix`) against stdio and against its floor, one request at a time:
//! the `allocate` + `deallocate` pair of 4 KiB on cpu (two round trips)
//!
//! 1. over a Unix-socket connection to `memcoord worker --unix PATH`;
//! 2. over the same worker's stdin and stdout;
//! 3. the floor: the same two lines echoed by a trivial echo server thread on a Unix socket
//!    (what `socat UNIX-LISTEN:… EXEC:cat` would do, without a process in between).
//!
//! Target (issue 15): the socket's p50 within 20 µs of the floor's.
//!
//! Run: `cargo bench --bench unix` (options: `-- --pairs N --json`).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_memcoord");

/// One line out, one line back, `pairs` times two; the p50 of a pair in µs.
fn pairs_p50(pairs: usize, w: &mut dyn Write, r: &mut dyn BufRead, echo: bool) -> f64 {
    let mut times = Vec::with_capacity(pairs);
    let mut line = String::new();
    for i in 0..pairs + pairs / 10 {
        let t = Instant::now();
        let alloc = format!(
            r#"{{"request_id":"a{i}","action":"memory.allocate","data":{{"device_id":"cpu","size_bytes":4096}}}}"#
        ) + "\n";
        // One write a line, as a client with a buffered writer makes.
        w.write_all(alloc.as_bytes()).unwrap();
        w.flush().unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        let id = if echo {
            "00000000-0000-4000-8000-000000000000".to_string()
        } else {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            v["data"]["allocation"]["allocation_id"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let free = format!(
            r#"{{"request_id":"d{i}","action":"memory.deallocate","data":{{"allocation_id":"{id}"}}}}"#
        ) + "\n";
        w.write_all(free.as_bytes()).unwrap();
        w.flush().unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        if i >= pairs / 10 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e6
}

fn echo_server(path: &std::path::Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut out = stream.try_clone().unwrap();
                let mut line = String::new();
                let mut r = BufReader::new(stream);
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    if out.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
}

fn connect(path: &std::path::Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pairs = args
        .iter()
        .position(|a| a == "--pairs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000usize);
    let json = args.iter().any(|a| a == "--json");
    let dir = std::env::temp_dir().join(format!("memcoord-bench-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (sock, echo) = (dir.join("mc.sock"), dir.join("echo.sock"));

    let mut child = Command::new(BIN)
        .args([
            "worker",
            "--budget",
            "cpu=1GiB",
            "--budget",
            "shm=64MiB",
            "--unix",
        ])
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = connect(&sock);
    let unix = pairs_p50(
        pairs,
        &mut s.try_clone().unwrap(),
        &mut BufReader::new(s),
        false,
    );
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let stdio = pairs_p50(pairs, &mut stdin, &mut stdout, false);
    drop(stdin);
    let _ = child.wait();

    echo_server(&echo);
    let e = connect(&echo);
    let floor = pairs_p50(
        pairs,
        &mut e.try_clone().unwrap(),
        &mut BufReader::new(e),
        true,
    );
    let _ = std::fs::remove_dir_all(&dir);

    if json {
        println!(
            "{}",
            serde_json::json!({"pairs": pairs, "unix_p50_us": unix, "stdio_p50_us": stdio,
                "echo_floor_p50_us": floor, "unix_minus_floor_us": unix - floor,
                "unix_over_stdio": unix / stdio, "target_met": unix - floor <= 20.0})
        );
    } else {
        println!("allocate+deallocate pair, one at a time, p50 of {pairs} pairs:");
        println!("  unix socket      {unix:8.1} µs");
        println!(
            "  stdio            {stdio:8.1} µs  (unix/stdio = {:.2}x)",
            unix / stdio
        );
        println!(
            "  echo floor       {floor:8.1} µs  (unix - floor = {:+.1} µs; target ≤ 20 µs: {})",
            unix - floor,
            if unix - floor <= 20.0 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}
