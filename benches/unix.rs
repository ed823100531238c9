//! The Unix socket (`--unix`) against stdio and against its floor, one request at a time:
//! the `allocate` + `deallocate` pair of 4 KiB on cpu (two round trips)
//!
//! 1. over a Unix-socket connection to `memcoord worker --unix PATH`;
//! 2. over the same worker's stdin and stdout;
//! 3. two lines of an unknown action over the socket (what the transport alone costs), and the
//!    worker's CPU time per pair (user and system, from /proc);
//!
//! each with a worker as started by default and with `--spin-us 0` (its readers sleep at once);
//! and
//!
//! 4. the floor: the same two lines echoed by a trivial echo server thread on a Unix socket
//!    (what `socat UNIX-LISTEN:… EXEC:cat` would do, without a process in between).
//!
//! Target (issue 15): the socket's p50 within 20 µs of the floor's.
//!
//! The client finds the allocation id with a byte search, as a fast client does, so that its
//! own cost stays close to the floor's.
//!
//! Run: `cargo bench --bench unix` (options: `-- --pairs N --json --no-gpu`).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_memcoord");

/// What one pair of requests is made of.
#[derive(Clone, Copy, PartialEq)]
enum Pair {
    /// `memory.allocate` of 4 KiB on cpu, then `memory.deallocate` of it.
    AllocFree,
    /// Two lines of an unknown action: memcoord reads, parses and answers an error, and does
    /// nothing else (the transport's share of a pair).
    Unknown,
    /// The echo floor: the allocate and deallocate lines come back as they were sent.
    Echo,
}

/// The `allocation_id` of an allocate answer, found as a fast client finds it (a byte search,
/// no JSON tree), so that the client's cost stays close to the echo floor's.
fn allocation_id(line: &str) -> &str {
    let key = "\"allocation_id\":\"";
    let at = line.find(key).expect("an allocation_id in the answer") + key.len();
    &line[at..at + 36]
}

/// One line out, one line back, `pairs` times two; the p50 of a pair in µs.
fn pairs_p50(pairs: usize, w: &mut dyn Write, r: &mut dyn BufRead, pair: Pair) -> f64 {
    let mut times = Vec::with_capacity(pairs);
    let mut line = String::new();
    let echo_id = "00000000-0000-4000-8000-000000000000";
    for i in 0..pairs + pairs / 10 {
        let t = Instant::now();
        let action = if pair == Pair::Unknown {
            "memory.nothing"
        } else {
            "memory.allocate"
        };
        let alloc = format!(
            r#"{{"request_id":"a{i}","action":"{action}","data":{{"device_id":"cpu","size_bytes":4096}}}}"#
        ) + "\n";
        // One write a line, as a client with a buffered writer makes.
        w.write_all(alloc.as_bytes()).unwrap();
        w.flush().unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        let id = match pair {
            Pair::AllocFree => allocation_id(&line),
            Pair::Unknown | Pair::Echo => echo_id,
        };
        let free = format!(
            r#"{{"request_id":"d{i}","action":"{}","data":{{"allocation_id":"{id}"}}}}"#,
            if pair == Pair::Unknown {
                "memory.nothing"
            } else {
                "memory.deallocate"
            }
        ) + "\n";
        w.write_all(free.as_bytes()).unwrap();
        w.flush().unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        if pair == Pair::AllocFree {
            assert!(line.contains("\"success\":true"), "{line}");
        }
        if i >= pairs / 10 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e6
}

/// CPU seconds (user, system) a process has used so far, from /proc.
fn cpu_seconds(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // /proc counts in USER_HZ, which the kernel fixes at 100 for user space on Linux.
    let tick = 100.0;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
            / tick
    };
    (field(11), field(12))
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

/// What one worker gave: p50s of a pair in µs and its CPU per pair (user, system) in µs.
struct Figures {
    unix: f64,
    unix_unknown: f64,
    stdio: f64,
    cpu_pair: (f64, f64),
    cpu_unknown: (f64, f64),
}

/// Starts a worker with `extra` arguments and measures it over its socket and its stdio.
fn measure(pairs: usize, sock: &std::path::Path, extra: &[&str]) -> Figures {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(BIN)
        .args([
            "worker",
            "--budget",
            "cpu=1GiB",
            "--budget",
            "shm=64MiB",
            "--unix",
        ])
        .arg(sock)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = connect(sock);
    let (mut sw, mut sr) = (s.try_clone().unwrap(), BufReader::new(s));
    // Warm up before the figures.
    pairs_p50(200, &mut sw, &mut sr, Pair::AllocFree);
    let cpu0 = cpu_seconds(child.id());
    let unix = pairs_p50(pairs, &mut sw, &mut sr, Pair::AllocFree);
    let cpu1 = cpu_seconds(child.id());
    let unix_unknown = pairs_p50(pairs, &mut sw, &mut sr, Pair::Unknown);
    let cpu2 = cpu_seconds(child.id());
    let rounds = (pairs + pairs / 10) as f64;
    let per_pair =
        |a: (f64, f64), b: (f64, f64)| ((b.0 - a.0) / rounds * 1e6, (b.1 - a.1) / rounds * 1e6);
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let stdio = pairs_p50(pairs, &mut stdin, &mut stdout, Pair::AllocFree);
    drop(stdin);
    let _ = child.wait();
    Figures {
        unix,
        unix_unknown,
        stdio,
        cpu_pair: per_pair(cpu0, cpu1),
        cpu_unknown: per_pair(cpu1, cpu2),
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
    let gpu: &[&str] = if args.iter().any(|a| a == "--no-gpu") {
        &["--no-gpu"]
    } else {
        &[]
    };
    let dir = std::env::temp_dir().join(format!("memcoord-bench-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (sock, echo) = (dir.join("mc.sock"), dir.join("echo.sock"));

    // The default (readers spin briefly before they sleep), then with the spin off.
    let spun = measure(pairs, &sock, gpu);
    let asleep = measure(pairs, &sock, &[gpu, &["--spin-us", "0"]].concat());

    echo_server(&echo);
    let e = connect(&echo);
    let floor = pairs_p50(
        pairs,
        &mut e.try_clone().unwrap(),
        &mut BufReader::new(e),
        Pair::Echo,
    );
    let _ = std::fs::remove_dir_all(&dir);

    let view = |f: &Figures| {
        serde_json::json!({"unix_p50_us": f.unix, "stdio_p50_us": f.stdio,
            "unix_unknown_action_p50_us": f.unix_unknown,
            "unix_minus_floor_us": f.unix - floor, "unix_over_stdio": f.unix / f.stdio,
            "server_cpu_us_per_pair": {"user": f.cpu_pair.0, "system": f.cpu_pair.1},
            "server_cpu_us_per_unknown_pair": {"user": f.cpu_unknown.0, "system": f.cpu_unknown.1}})
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"pairs": pairs, "echo_floor_p50_us": floor,
                "default": view(&spun), "spin_off": view(&asleep),
                "target_met": spun.unix - floor <= 20.0})
        );
        return;
    }
    println!("allocate+deallocate pair, one at a time, p50 of {pairs} pairs:");
    println!("  echo floor (blocking echo thread)   {floor:8.1} µs");
    for (name, f) in [("default (--spin-us 50)", &spun), ("--spin-us 0", &asleep)] {
        println!("  {name}:");
        println!(
            "    unix socket      {:8.1} µs  (unix - floor = {:+.1} µs; target ≤ 20 µs: {})",
            f.unix,
            f.unix - floor,
            if f.unix - floor <= 20.0 {
                "met"
            } else {
                "NOT met"
            }
        );
        println!(
            "    stdio            {:8.1} µs  (unix/stdio = {:.2}x)",
            f.stdio,
            f.unix / f.stdio
        );
        println!(
            "    unknown action   {:8.1} µs  (the transport's share: read, parse, answer an error)",
            f.unix_unknown
        );
        println!(
            "    worker CPU per pair: {:.1} µs user + {:.1} µs system (unknown action: {:.1} + {:.1})",
            f.cpu_pair.0, f.cpu_pair.1, f.cpu_unknown.0, f.cpu_unknown.1
        );
    }
}
