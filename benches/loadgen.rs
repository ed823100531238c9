//! Load and soak generator (issue 8): drives the real `memcoord` binary, as `memcoord worker`
//! over stdio and as `memcoord serve` over HTTP, from 32 concurrent clients with a realistic mix
//! of requests, for a set number of requests; then checks that
//!
//! - every request got exactly one response (no lost, duplicated or unknown `request_id`),
//! - memory is back where it started: after a `ClearCache` on each device (which hands the page
//!   cache back), `allocated_bytes`, `allocation_count` and `reserved_bytes` of `cpu` and `shm`
//!   equal their values at the start (model loaded), and, once the model is unloaded, those of
//!   before it was loaded; the process's RSS, less the pages freed with MADV_FREE that the
//!   kernel has not taken yet, grew by at most 64 MiB (reported either way);
//! - no request was answered `INTERNAL_ERROR`, or any error other than `OUT_OF_MEMORY` (which is
//!   a legitimate answer under load and is counted); every answer has the envelope's shape and
//!   agrees with its request (freed bytes, transfer completed to the right device, lease ids);
//! - the coordinator exits with status 0 (stdin closed; SIGTERM for the server);
//!
//! and reports throughput and latency percentiles (per request, measured by the client, from
//! before its write to after its response was read), overall and by action.
//!
//! The coordinator runs with `--no-gpu --budget cpu=1GiB --budget shm=1GiB --model-root <tmp>`;
//! a 1 MiB safetensors model (one F32 tensor) written by the bench is loaded on `shm` before the
//! run. Each client is closed-loop (one request in flight) and keeps up to 32 live allocations
//! of its own. Its mix, per thousand operations:
//!
//! | per mille | operation |
//! |---|---|
//! | 350 | `memory.allocate` on `cpu` or `shm`, 4 KiB–1 MiB (log-uniform), General / Cache / Activations / Temporary, `timeout_seconds` 0 |
//! | 350 | `memory.deallocate` of one of its own allocations |
//! | 50 / 49 / 49 | `memory.get_usage` / `memory.get_status` (without the allocation list) / `memory.get_pressure` |
//! | 80 | `memory.model_acquire` of the shared model, then `memory.model_release` of the lease (two requests) |
//! | 70 | `memory.transfer` of one of its own allocations `cpu` ↔ `shm`, `mode` move, `wait_for_completion` |
//! | 2 | `memory.defragment` of `cpu` or `shm` (it holds the engine while it moves bytes, hence rare) |
//!
//! At the end every client frees what it still holds (these frees are counted as `cleanup`,
//! beyond the set number of requests).
//!
//! - stdio: one worker process; the clients share its stdin (one line per request, written under
//!   a lock) and one reader thread routes each response line by its `request_id`
//!   (`c<client>-<n>`) to its client, keeping a bitmap of the ids answered;
//! - HTTP: one server process on a free loopback port; each client has its own keep-alive
//!   HTTP/1.1 connection (std `TcpStream`, hand-written requests) and POSTs envelopes to
//!   `/v1/command`.
//!
//! Run: `cargo bench --bench loadgen` (both modes, 1,000,000 requests each from 32 clients).
//! Options: `-- --quick` (50,000 requests), `--requests N`, `--clients N`, `--seed N`,
//! `--mode stdio|http|both` (or just `stdio` / `http`), `--budget SIZE` (the budget of `cpu`
//! and of `shm`, default `1GiB`; `16MiB` makes `OUT_OF_MEMORY` answers and model evictions
//! common, and then a `model_acquire` answered `MODEL_NOT_FOUND` is accepted too, since the
//! idle model may be unloaded to make room). The bench panics (non-zero exit) when a check
//! fails. Results: docs/benchmarks.md, "Load and soak (issue 8)".
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // test code: libc calls and memory maps of its own

use hdrhistogram::Histogram;
use memcoord::api::ActionSpec;
use memcoord::api::actions::{
    allocate::Allocate, deallocate::Deallocate, defragment::Defragment,
    get_allocations::GetAllocations, get_pressure::GetPressure, get_status::GetStatus,
    get_usage::GetUsage, model_acquire::ModelAcquire, model_load::ModelLoad,
    model_release::ModelRelease, model_status::ModelStatus, transfer::Transfer,
};
use memcoord::protocol::{ModelState, TransferStatus};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_memcoord");
const MODEL_NAME: &str = "loadgen_model";
const MODEL_FILE: &str = "m.safetensors";
/// F32 elements of the model's one tensor: 1 MiB.
const MODEL_FLOATS: usize = 262_144;
const DEVICES: [&str; 2] = ["cpu", "shm"];
const TYPES: [&str; 4] = ["General", "Cache", "Activations", "Temporary"];
const MAX_HELD: usize = 32;
const MIN_SIZE: u64 = 4 << 10;
const MAX_SIZE: u64 = 1 << 20;
/// A request not answered within this long counts as lost (and ends its client).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// RSS growth (less pages freed lazily, see `Rss`) above which the run fails.
const RSS_GROWTH_LIMIT: i64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Allocate,
    Deallocate,
    GetUsage,
    GetStatus,
    GetPressure,
    Acquire,
    Release,
    Transfer,
    Defragment,
    Cleanup,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Allocate => "allocate",
            Op::Deallocate => "deallocate",
            Op::GetUsage => "get_usage",
            Op::GetStatus => "get_status",
            Op::GetPressure => "get_pressure",
            Op::Acquire => "model_acquire",
            Op::Release => "model_release",
            Op::Transfer => "transfer (move)",
            Op::Defragment => "defragment",
            Op::Cleanup => "cleanup deallocate",
        }
    }
}

/// The mix, per thousand operations (`Acquire` is an acquire and a release).
const MIX: [(Op, u32); 8] = [
    (Op::Allocate, 350),
    (Op::Deallocate, 350),
    (Op::GetUsage, 50),
    (Op::GetStatus, 49),
    (Op::GetPressure, 49),
    (Op::Acquire, 80),
    (Op::Transfer, 70),
    (Op::Defragment, 2),
];

/// splitmix64: small, fast and reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Log-uniform between `MIN_SIZE` and `MAX_SIZE`, any byte count.
    fn size(&mut self) -> u64 {
        let (lo, hi) = ((MIN_SIZE as f64).ln(), (MAX_SIZE as f64).ln());
        ((lo + (hi - lo) * self.unit()).exp() as u64).clamp(MIN_SIZE, MAX_SIZE)
    }
    fn op(&mut self) -> Op {
        let mut r = self.below(1000) as u32;
        for (op, w) in MIX {
            if r < w {
                return op;
            }
            r -= w;
        }
        unreachable!("the mix adds up to 1000")
    }
}

// ---------------------------------------------------------------------------------------------
// Transports

/// One client's way to the coordinator: one request at a time.
trait Session: Send {
    /// Sends one request envelope (with a fresh `request_id`) and returns its response. `Err`
    /// is a lost response or a broken transport: the client stops.
    fn call(&mut self, action: &str, data: &str) -> Result<Value, String>;
    /// After the client's last request: nothing more may arrive for it.
    fn finish(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// What the transport saw of the responses, beyond each client's own view.
#[derive(Default, Debug)]
struct Delivery {
    sent: u64,
    answered: u64,
    lost: u64,
    duplicated: u64,
    /// Responses whose `request_id` is null, unreadable or names no request sent.
    unknown: u64,
    samples: Vec<String>,
    clean_exit: bool,
}

fn request_line(out: &mut String, client: usize, n: u64, action: &str, data: &str) {
    out.clear();
    write!(
        out,
        r#"{{"request_id":"c{client}-{n}","action":"{action}","data":{data}}}"#
    )
    .unwrap();
}

fn parse_id(id: &str) -> Option<(usize, u64)> {
    let (c, n) = id.strip_prefix('c')?.split_once('-')?;
    Some((c.parse().ok()?, n.parse().ok()?))
}

// --- stdio

struct StdioShared {
    stdin: Mutex<Option<ChildStdin>>,
    /// Requests written, per session.
    issued: Vec<AtomicU64>,
}

struct StdioSession {
    idx: usize,
    next: u64,
    shared: Arc<StdioShared>,
    rx: Receiver<(u64, Value)>,
    line: String,
}

impl Session for StdioSession {
    fn call(&mut self, action: &str, data: &str) -> Result<Value, String> {
        let n = self.next;
        self.next += 1;
        request_line(&mut self.line, self.idx, n, action, data);
        self.line.push('\n');
        {
            let mut stdin = self.shared.stdin.lock().unwrap();
            let w = stdin.as_mut().ok_or("the worker's stdin is closed")?;
            self.shared.issued[self.idx].fetch_add(1, Ordering::SeqCst);
            w.write_all(self.line.as_bytes())
                .map_err(|e| format!("writing to the worker: {e}"))?;
        }
        loop {
            match self.rx.recv_timeout(RESPONSE_TIMEOUT) {
                Ok((m, v)) if m == n => return Ok(v),
                // A second answer to an earlier request: the reader has counted it.
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no response to c{}-{n} ({action}) within {} s",
                        self.idx,
                        RESPONSE_TIMEOUT.as_secs()
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "the worker's stdout ended before c{}-{n} was answered",
                        self.idx
                    ));
                }
            }
        }
    }
}

/// Reads every response line, routes it to its client and keeps count of what was answered.
fn stdio_reader(
    stdout: impl Read,
    senders: Vec<Sender<(u64, Value)>>,
    shared: Arc<StdioShared>,
) -> (Vec<Vec<u64>>, Delivery) {
    let mut seen: Vec<Vec<u64>> = vec![Vec::new(); senders.len()];
    let mut d = Delivery::default();
    let mut r = BufReader::with_capacity(1 << 20, stdout);
    let mut buf = Vec::with_capacity(1 << 16);
    let note = |d: &mut Delivery, what: String| {
        if d.samples.len() < 10 {
            d.samples.push(what);
        }
    };
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                note(&mut d, format!("reading the worker's stdout: {e}"));
                break;
            }
        }
        let v: Value = match serde_json::from_slice(&buf) {
            Ok(v) => v,
            Err(e) => {
                d.unknown += 1;
                note(
                    &mut d,
                    format!(
                        "a stdout line that is not JSON ({e}): {}",
                        String::from_utf8_lossy(&buf[..buf.len().min(300)])
                    ),
                );
                continue;
            }
        };
        let id = v
            .get("request_id")
            .and_then(Value::as_str)
            .and_then(parse_id);
        let Some((c, n)) =
            id.filter(|&(c, n)| c < senders.len() && n < shared.issued[c].load(Ordering::SeqCst))
        else {
            d.unknown += 1;
            note(
                &mut d,
                format!(
                    "a response for no request sent: {}",
                    String::from_utf8_lossy(&buf[..buf.len().min(300)])
                ),
            );
            continue;
        };
        let (word, bit) = ((n / 64) as usize, 1u64 << (n % 64));
        if seen[c].len() <= word {
            seen[c].resize(word + 1, 0);
        }
        if seen[c][word] & bit != 0 {
            d.duplicated += 1;
            note(&mut d, format!("a second response to c{c}-{n}"));
            continue;
        }
        seen[c][word] |= bit;
        d.answered += 1;
        let _ = senders[c].send((n, v));
    }
    (seen, d)
}

struct StdioRun {
    child: Child,
    shared: Arc<StdioShared>,
    receivers: Vec<Option<Receiver<(u64, Value)>>>,
    reader: Option<JoinHandle<(Vec<Vec<u64>>, Delivery)>>,
}

impl StdioRun {
    fn start(root: &Path, sessions: usize) -> StdioRun {
        let mut child = Command::new(BIN)
            .arg("worker")
            .args(coordinator_args(root))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn memcoord worker");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let shared = Arc::new(StdioShared {
            stdin: Mutex::new(Some(stdin)),
            issued: (0..sessions).map(|_| AtomicU64::new(0)).collect(),
        });
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..sessions).map(|_| mpsc::channel()).unzip();
        let reader = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("stdio-reader".into())
                .spawn(move || stdio_reader(stdout, senders, shared))
                .unwrap()
        };
        StdioRun {
            child,
            shared,
            receivers: receivers.into_iter().map(Some).collect(),
            reader: Some(reader),
        }
    }

    fn session(&mut self, idx: usize) -> Box<dyn Session> {
        Box::new(StdioSession {
            idx,
            next: 0,
            shared: Arc::clone(&self.shared),
            rx: self.receivers[idx].take().expect("one session per index"),
            line: String::with_capacity(512),
        })
    }

    /// Closes stdin (the clean way to stop a worker), reads stdout to its end and counts.
    fn shutdown(mut self) -> Delivery {
        drop(self.shared.stdin.lock().unwrap().take());
        let (seen, mut d) = self.reader.take().unwrap().join().expect("reader thread");
        for (c, bits) in seen.iter().enumerate() {
            let issued = self.shared.issued[c].load(Ordering::SeqCst);
            d.sent += issued;
            let answered: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
            if answered < issued {
                d.lost += issued - answered;
                let missing = (0..issued).find(|&n| {
                    bits.get((n / 64) as usize)
                        .is_none_or(|w| w & (1 << (n % 64)) == 0)
                });
                if d.samples.len() < 10 {
                    d.samples.push(format!(
                        "client {c}: {} of {issued} requests never answered (first: c{c}-{})",
                        issued - answered,
                        missing.unwrap_or(0)
                    ));
                }
            }
        }
        let status = self.child.wait().expect("wait for the worker");
        d.clean_exit = status.success();
        if !status.success() {
            d.samples.push(format!("the worker exited with {status}"));
        }
        d
    }
}

impl Drop for StdioRun {
    /// Never leaves a worker behind, even when the bench panics.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// --- HTTP

#[derive(Default)]
struct HttpCounters {
    sent: AtomicU64,
    answered: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    unknown: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl HttpCounters {
    fn note(&self, what: String) {
        let mut s = self.samples.lock().unwrap();
        if s.len() < 10 {
            s.push(what);
        }
    }
}

struct HttpSession {
    idx: usize,
    next: u64,
    stream: TcpStream,
    buf: Vec<u8>,
    req: Vec<u8>,
    body: String,
    counters: Arc<HttpCounters>,
}

impl HttpSession {
    fn fill(&mut self) -> std::io::Result<()> {
        let len = self.buf.len();
        if self.buf.capacity() - len < 16 << 10 {
            self.buf.reserve(64 << 10);
        }
        let cap = self.buf.capacity();
        self.buf.resize(cap, 0);
        let got = self.stream.read(&mut self.buf[len..]);
        match got {
            Ok(0) => {
                self.buf.truncate(len);
                Err(ErrorKind::UnexpectedEof.into())
            }
            Ok(k) => {
                self.buf.truncate(len + k);
                Ok(())
            }
            Err(e) => {
                self.buf.truncate(len);
                Err(e)
            }
        }
    }

    /// Reads one response: (HTTP status, body).
    fn read_response(&mut self) -> Result<(u16, Vec<u8>), String> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()
                .map_err(|e| format!("reading the response head: {e}"))?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.strip_prefix("HTTP/1.1 "))
            .and_then(|l| l.get(..3))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("bad status line in {head:?}"))?;
        let length = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
        while self.buf.len() < head_end + length {
            self.fill()
                .map_err(|e| format!("reading the response body: {e}"))?;
        }
        let body = self.buf[head_end..head_end + length].to_vec();
        self.buf.drain(..head_end + length);
        Ok((status, body))
    }
}

impl Session for HttpSession {
    fn call(&mut self, action: &str, data: &str) -> Result<Value, String> {
        let n = self.next;
        self.next += 1;
        let id = format!("c{}-{n}", self.idx);
        request_line(&mut self.body, self.idx, n, action, data);
        self.req.clear();
        write!(
            self.req,
            "POST /v1/command HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            self.body.len(),
            self.body
        )
        .unwrap();
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        let lost = |c: &HttpCounters, why: String| {
            c.lost.fetch_add(1, Ordering::Relaxed);
            c.note(format!("{id} ({action}): {why}"));
            format!("{id} ({action}) lost: {why}")
        };
        if let Err(e) = self.stream.write_all(&self.req) {
            return Err(lost(&self.counters, format!("writing the request: {e}")));
        }
        let (status, body) = self
            .read_response()
            .map_err(|why| lost(&self.counters, why))?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            self.counters.unknown.fetch_add(1, Ordering::Relaxed);
            let why = format!(
                "{id}: a response body that is not JSON ({e}): {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
            self.counters.note(why.clone());
            why
        })?;
        let got = v.get("request_id").and_then(Value::as_str);
        if got != Some(id.as_str()) {
            // Keep-alive answers in order: another id is a second answer or a stray one.
            self.counters.unknown.fetch_add(1, Ordering::Relaxed);
            let why = format!("{id}: the response carries request_id {got:?}");
            self.counters.note(why.clone());
            return Err(why);
        }
        if v.get("status_code").and_then(Value::as_u64) != Some(u64::from(status)) {
            self.counters.note(format!(
                "{id}: HTTP status {status} differs from status_code {:?}",
                v.get("status_code")
            ));
        }
        self.counters.answered.fetch_add(1, Ordering::Relaxed);
        Ok(v)
    }

    /// Nothing may be left on the connection, nor arrive on it now.
    fn finish(&mut self) -> Result<(), String> {
        let mut extra = self.buf.len();
        self.stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 4096];
        match self.stream.read(&mut b) {
            Ok(k) => extra += k,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("connection of client {}: {e}", self.idx)),
        }
        if extra > 0 {
            self.counters.duplicated.fetch_add(1, Ordering::Relaxed);
            let why = format!(
                "client {}: {extra} unexpected bytes on the connection after its last response",
                self.idx
            );
            self.counters.note(why.clone());
            return Err(why);
        }
        Ok(())
    }
}

struct HttpRun {
    child: Child,
    addr: SocketAddr,
    counters: Arc<HttpCounters>,
}

impl Drop for HttpRun {
    /// Never leaves a server behind, even when the bench panics.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HttpRun {
    fn start(root: &Path) -> HttpRun {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(coordinator_args(root))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn memcoord serve");
        // "memcoord: serving on http://127.0.0.1:PORT/ (...)"; the rest of stderr is passed on.
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let addr = loop {
            line.clear();
            if stderr
                .read_line(&mut line)
                .expect("read the server's stderr")
                == 0
            {
                panic!("memcoord serve ended before it was listening");
            }
            if let Some(rest) = line.split("serving on http://").nth(1) {
                let addr = rest.split('/').next().unwrap();
                break addr.parse::<SocketAddr>().expect("the server's address");
            }
            eprint!("{line}");
        };
        std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).is_ok_and(|k| k > 0) {
                eprint!("{line}");
                line.clear();
            }
        });
        HttpRun {
            child,
            addr,
            counters: Arc::default(),
        }
    }

    fn session(&mut self, idx: usize) -> Box<dyn Session> {
        let stream = TcpStream::connect(self.addr).expect("connect to memcoord serve");
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(RESPONSE_TIMEOUT)).unwrap();
        Box::new(HttpSession {
            idx,
            next: 0,
            stream,
            buf: Vec::with_capacity(64 << 10),
            req: Vec::with_capacity(1024),
            body: String::with_capacity(512),
            counters: Arc::clone(&self.counters),
        })
    }

    /// SIGTERM, the clean way to stop a server; it must exit with status 0.
    fn shutdown(mut self) -> Delivery {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let status = self.child.wait().expect("wait for the server");
        let c = &self.counters;
        let mut samples = std::mem::take(&mut *c.samples.lock().unwrap());
        if !status.success() {
            samples.push(format!("the server exited with {status}"));
        }
        Delivery {
            sent: c.sent.load(Ordering::Relaxed),
            answered: c.answered.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            duplicated: c.duplicated.load(Ordering::Relaxed),
            unknown: c.unknown.load(Ordering::Relaxed),
            samples,
            clean_exit: status.success(),
        }
    }
}

/// The budget of `cpu` and of `shm` (`--budget`, default 1GiB).
static BUDGET: OnceLock<String> = OnceLock::new();

/// With `--budget`, the devices may fill up: then idle models are evicted (offloaded to `cpu`,
/// or unloaded when `cpu` is full too), so `model_acquire` may answer `MODEL_NOT_FOUND`, and the
/// model may end the run elsewhere. With the default budgets neither may happen.
fn small_budget() -> bool {
    BUDGET.get().is_some()
}

fn coordinator_args(root: &Path) -> Vec<String> {
    let budget = BUDGET.get().map_or("1GiB", String::as_str);
    vec![
        "--no-gpu".into(),
        "--budget".into(),
        format!("cpu={budget}"),
        "--budget".into(),
        format!("shm={budget}"),
        "--model-root".into(),
        root.to_str().expect("UTF-8 temp path").into(),
    ]
}

// ---------------------------------------------------------------------------------------------
// Clients

/// An answer: the action's `data`, or a failure (counted by `Client::req`).
enum Reply {
    Ok(Value),
    Err,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap()
}

struct Tally {
    requests: u64,
    ok: u64,
    oom: u64,
    /// `model_acquire` answered MODEL_NOT_FOUND: the model was evicted (small budgets only).
    model_gone: u64,
    /// Error codes other than OUT_OF_MEMORY, each a failure of the run.
    errors: BTreeMap<String, u64>,
    /// Answers that do not have the shape the protocol promises.
    violations: u64,
    samples: Vec<String>,
    /// Per action: latency (ns), answers ok, answers OUT_OF_MEMORY.
    by_op: BTreeMap<Op, (Histogram<u64>, u64, u64)>,
    all: Histogram<u64>,
    /// Why the client stopped early, if it did.
    aborted: Option<String>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            requests: 0,
            ok: 0,
            oom: 0,
            model_gone: 0,
            errors: BTreeMap::new(),
            violations: 0,
            samples: Vec::new(),
            by_op: BTreeMap::new(),
            all: histogram(),
            aborted: None,
        }
    }

    fn note(&mut self, what: String) {
        if self.samples.len() < 10 {
            self.samples.push(what);
        }
    }

    fn violation(&mut self, what: String) {
        self.violations += 1;
        self.note(format!("protocol violation: {what}"));
    }

    fn merge(&mut self, o: Tally) {
        self.requests += o.requests;
        self.ok += o.ok;
        self.oom += o.oom;
        self.model_gone += o.model_gone;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.violations += o.violations;
        for s in o.samples {
            self.note(s);
        }
        for (op, (h, ok, oom)) in o.by_op {
            let e = self.by_op.entry(op).or_insert_with(|| (histogram(), 0, 0));
            e.0.add(&h).unwrap();
            e.1 += ok;
            e.2 += oom;
        }
        self.all.add(&o.all).unwrap();
        if let Some(a) = o.aborted {
            self.note(format!("client stopped: {a}"));
            self.aborted.get_or_insert(a);
        }
    }
}

struct Held {
    id: String,
    device: usize,
    size: u64,
}

struct Client<'a> {
    idx: usize,
    session: Box<dyn Session + 'a>,
    tally: Tally,
    progress: &'a AtomicU64,
}

impl Client<'_> {
    /// One request: timed, counted, its envelope checked.
    fn req(&mut self, op: Op, action: &str, data: &str) -> Result<Reply, String> {
        let t = Instant::now();
        let v = self.session.call(action, data)?;
        let ns = (t.elapsed().as_nanos() as u64).max(1);
        self.progress.fetch_add(1, Ordering::Relaxed);
        self.tally.requests += 1;
        self.tally.all.record(ns).unwrap();
        let e = self
            .tally
            .by_op
            .entry(op)
            .or_insert_with(|| (histogram(), 0, 0));
        e.0.record(ns).unwrap();
        let success = v.get("success").and_then(Value::as_bool);
        let code = v.get("error_code").and_then(Value::as_str);
        let status = v.get("status_code").and_then(Value::as_u64);
        let payload = v.get("data").filter(|d| !d.is_null());
        let reply = match (success, code, payload, status) {
            (Some(true), None, Some(d), Some(200)) => {
                e.1 += 1;
                self.tally.ok += 1;
                Reply::Ok(d.clone())
            }
            (Some(false), Some(code), None, Some(s)) if s >= 400 => {
                let msg = v
                    .get("error_message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if code == "OUT_OF_MEMORY" {
                    e.2 += 1;
                    self.tally.oom += 1;
                } else if code == "MODEL_NOT_FOUND" && op == Op::Acquire && small_budget() {
                    self.tally.model_gone += 1;
                } else {
                    *self.tally.errors.entry(code.to_string()).or_default() += 1;
                    self.tally.note(format!(
                        "client {}: {action} {data}: {code}: {msg}",
                        self.idx
                    ));
                }
                Reply::Err
            }
            _ => {
                let text = v.to_string();
                self.tally.violation(format!(
                    "{action}: not a valid envelope: {}",
                    &text[..text.len().min(300)]
                ));
                Reply::Err
            }
        };
        Ok(reply)
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            self.tally.violation(w);
        }
    }

    fn deallocate(&mut self, op: Op, h: Held) -> Result<Option<Held>, String> {
        let data = format!(r#"{{"allocation_id":"{}"}}"#, h.id);
        match self.req(op, "memory.deallocate", &data)? {
            Reply::Ok(d) => {
                let ok = answer::<Deallocate>(&d)
                    .is_some_and(|r| r.freed_bytes == h.size && r.device_id == DEVICES[h.device]);
                self.check(ok, || {
                    format!(
                        "deallocate of {} ({} B on {}) answered {d}",
                        h.id, h.size, DEVICES[h.device]
                    )
                });
                Ok(None)
            }
            // Still held (the error is counted); freed again at the end.
            Reply::Err => Ok(Some(h)),
        }
    }

    fn run(&mut self, quota: u64, seed: u64) -> Result<(), String> {
        let mut rng = Rng(seed);
        let mut held: Vec<Held> = Vec::with_capacity(MAX_HELD);
        let mut sent = 0u64;
        while sent < quota {
            let mut op = rng.op();
            if op == Op::Allocate && held.len() >= MAX_HELD {
                op = Op::Deallocate;
            }
            if matches!(op, Op::Deallocate | Op::Transfer) && held.is_empty() {
                op = Op::Allocate;
            }
            if op == Op::Acquire && quota - sent < 2 {
                op = Op::GetPressure;
            }
            let device = rng.below(2) as usize;
            match op {
                Op::Allocate => {
                    let size = rng.size();
                    let kind = TYPES[rng.below(4) as usize];
                    let data = format!(
                        r#"{{"device_id":"{}","size_bytes":{size},"allocation_type":"{kind}","purpose":"loadgen","timeout_seconds":0}}"#,
                        DEVICES[device]
                    );
                    sent += 1;
                    if let Reply::Ok(d) = self.req(op, "memory.allocate", &data)? {
                        match answer::<Allocate>(&d).map(|r| r.allocation) {
                            Some(a) if a.size_bytes == size && a.device_id == DEVICES[device] => {
                                held.push(Held {
                                    id: a.allocation_id,
                                    device,
                                    size,
                                });
                            }
                            _ => self.tally.violation(format!(
                                "allocate of {size} B on {} answered {d}",
                                DEVICES[device]
                            )),
                        }
                    }
                }
                Op::Deallocate => {
                    let h = held.swap_remove(rng.below(held.len() as u64) as usize);
                    sent += 1;
                    if let Some(h) = self.deallocate(op, h)? {
                        held.push(h);
                    }
                }
                Op::GetUsage => {
                    sent += 1;
                    let data = format!(r#"{{"device_id":"{}"}}"#, DEVICES[device]);
                    if let Reply::Ok(d) = self.req(op, "memory.get_usage", &data)? {
                        let ok = answer::<GetUsage>(&d).is_some_and(|u| {
                            u.device_id == DEVICES[device] && u.reserved_bytes >= u.allocated_bytes
                        });
                        self.check(ok, || format!("get_usage answered {d}"));
                    }
                }
                Op::GetStatus => {
                    sent += 1;
                    let data = format!(
                        r#"{{"device_id":"{}","include_allocations":false,"include_fragmentation":true}}"#,
                        DEVICES[device]
                    );
                    if let Reply::Ok(d) = self.req(op, "memory.get_status", &data)? {
                        let ok = answer::<GetStatus>(&d).is_some_and(|st| {
                            st.device_id == DEVICES[device]
                                && st.usage_stats.is_some()
                                && st.fragmentation.is_some()
                        });
                        self.check(ok, || format!("get_status answered {d}"));
                    }
                }
                Op::GetPressure => {
                    sent += 1;
                    if let Reply::Ok(d) = self.req(op, "memory.get_pressure", "{}")? {
                        let ok = answer::<GetPressure>(&d).is_some_and(|p| p.devices.len() == 2);
                        self.check(ok, || format!("get_pressure answered {d}"));
                    }
                }
                Op::Acquire => {
                    sent += 2;
                    let data = format!(r#"{{"model_name":"{MODEL_NAME}","timeout_seconds":0}}"#);
                    let reply = self.req(op, "memory.model_acquire", &data)?;
                    let lease = match &reply {
                        Reply::Ok(d) => answer::<ModelAcquire>(d).map(|a| a.lease_id),
                        Reply::Err => None,
                    };
                    match (lease, reply) {
                        (Some(lease), _) => {
                            let data = format!(r#"{{"lease_id":"{lease}"}}"#);
                            if let Reply::Ok(d) =
                                self.req(Op::Release, "memory.model_release", &data)?
                            {
                                let ok = answer::<ModelRelease>(&d).is_some_and(|r| {
                                    r.lease_id == lease && r.model_name == MODEL_NAME
                                });
                                self.check(ok, || format!("model_release answered {d}"));
                            }
                        }
                        (None, Reply::Ok(d)) => {
                            self.tally.violation(format!("model_acquire answered {d}"));
                            sent -= 1;
                        }
                        // No lease (OUT_OF_MEMORY or an error, counted): nothing to release.
                        (None, Reply::Err) => sent -= 1,
                    }
                }
                Op::Transfer => {
                    let i = rng.below(held.len() as u64) as usize;
                    let (src, dst) = (held[i].device, 1 - held[i].device);
                    let data = format!(
                        r#"{{"allocation_id":"{}","source_device_id":"{}","destination_device_id":"{}","mode":"move","wait_for_completion":true}}"#,
                        held[i].id, DEVICES[src], DEVICES[dst]
                    );
                    sent += 1;
                    if let Reply::Ok(d) = self.req(op, "memory.transfer", &data)? {
                        let ok = answer::<Transfer>(&d).is_some_and(|t| {
                            t.status == TransferStatus::Completed
                                && t.destination_device_id == DEVICES[dst]
                                && t.destination_allocation_id.as_deref()
                                    == Some(held[i].id.as_str())
                                && t.total_bytes == held[i].size
                        });
                        if ok {
                            held[i].device = dst;
                        } else {
                            let id = held[i].id.clone();
                            self.tally
                                .violation(format!("transfer of {id} answered {d}"));
                        }
                    }
                }
                Op::Defragment => {
                    sent += 1;
                    let data = format!(r#"{{"device_id":"{}"}}"#, DEVICES[device]);
                    if let Reply::Ok(d) = self.req(op, "memory.defragment", &data)? {
                        let ok = answer::<Defragment>(&d)
                            .is_some_and(|r| r.device_id == DEVICES[device]);
                        self.check(ok, || format!("defragment answered {d}"));
                    }
                }
                Op::Release | Op::Cleanup => unreachable!(),
            }
        }
        // Free what is left; an allocation whose free fails is tried once more.
        for round in 0..2 {
            let mut kept = Vec::new();
            for h in held.drain(..) {
                if let Some(h) = self.deallocate(Op::Cleanup, h)? {
                    kept.push(h);
                }
            }
            held = kept;
            if held.is_empty() {
                break;
            }
            if round == 1 {
                let ids: Vec<_> = held.iter().map(|h| h.id.clone()).collect();
                self.tally
                    .note(format!("client {} could not free {ids:?}", self.idx));
            }
        }
        self.session.finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Calls that must succeed (setup and read-outs): panics otherwise.
fn must(s: &mut dyn Session, action: &str, data: &str) -> Value {
    let v = s
        .call(action, data)
        .unwrap_or_else(|e| panic!("{action}: {e}"));
    assert_eq!(v["success"], Value::Bool(true), "{action} {data}: {v}");
    v["data"].clone()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    allocated: u64,
    reserved: u64,
    count: u64,
    model: u64,
}

/// The answer's `data` read as the response of `A` (None: not its shape).
fn answer<A: ActionSpec>(d: &Value) -> Option<A::Response> {
    A::Response::deserialize(d).ok()
}

/// [`must`], its answer read as the response of `A`.
fn must_answer<A: ActionSpec>(s: &mut dyn Session, data: &str) -> A::Response {
    let d = must(s, A::NAME, data);
    answer::<A>(&d).unwrap_or_else(|| panic!("{}: not its answer: {d}", A::NAME))
}

fn usage(s: &mut dyn Session, device: &str) -> Usage {
    let u = must_answer::<GetUsage>(s, &format!(r#"{{"device_id":"{device}"}}"#));
    Usage {
        allocated: u.allocated_bytes,
        reserved: u.reserved_bytes,
        count: u.allocation_count,
        model: u.model_bytes,
    }
}

/// Where the model is: its state, the device that holds its bytes and its allocation's offset
/// there (`shm` only), or `unloaded`.
fn model_state(s: &mut dyn Session) -> String {
    let v = s
        .call(
            "memory.model_status",
            &format!(r#"{{"model_name":"{MODEL_NAME}"}}"#),
        )
        .expect("memory.model_status");
    if v["error_code"] == "MODEL_NOT_FOUND" {
        return "unloaded".into();
    }
    assert_eq!(v["success"], Value::Bool(true), "{v}");
    let status = answer::<ModelStatus>(&v["data"]).unwrap_or_else(|| panic!("{v}"));
    let m = &status.models[0];
    let device = &m.resident_device_id;
    let allocs = must_answer::<GetAllocations>(
        s,
        &format!(r#"{{"device_id":"{device}","owner":"model:{MODEL_NAME}"}}"#),
    );
    let offsets: Vec<String> = allocs
        .allocations
        .iter()
        .map(|x| {
            x.handle
                .as_ref()
                .map_or("-".into(), |h| h.offset.to_string())
        })
        .collect();
    format!(
        "{} on {device} at offset {}",
        m.state.name(),
        offsets.join(",")
    )
}

fn clear_caches(s: &mut dyn Session) {
    for dev in DEVICES {
        must(
            s,
            "memory.optimize",
            &format!(r#"{{"device_id":"{dev}","optimization_type":"ClearCache"}}"#),
        );
    }
}

/// The process's resident size, from /proc. `lazy_free` is memory the process gave back with
/// MADV_FREE (how memcoord returns `cpu` pages) that the kernel has not taken yet: it still
/// counts in VmRSS until the kernel needs it.
#[derive(Clone, Copy, Debug, Default)]
struct Rss {
    vm_rss: u64,
    rss_shmem: u64,
    lazy_free: u64,
}

impl Rss {
    fn read(pid: u32) -> Rss {
        let field = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        Rss {
            vm_rss: field(&status, "VmRSS:"),
            rss_shmem: field(&status, "RssShmem:"),
            lazy_free: field(&rollup, "LazyFree:"),
        }
    }
    fn effective(&self) -> u64 {
        self.vm_rss.saturating_sub(self.lazy_free)
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn write_model(root: &Path) {
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{MODEL_FLOATS}],"data_offsets":[0,{}]}}}}"#,
        MODEL_FLOATS * 4
    );
    let mut header = header.into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut file = Vec::with_capacity(8 + header.len() + MODEL_FLOATS * 4);
    file.extend_from_slice(&(header.len() as u64).to_le_bytes());
    file.extend_from_slice(&header);
    for i in 0..MODEL_FLOATS {
        file.extend_from_slice(&(i as f32 * 0.5).to_le_bytes());
    }
    std::fs::write(root.join(MODEL_FILE), file).expect("write the model file");
}

// ---------------------------------------------------------------------------------------------
// One run

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Stdio,
    Http,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Stdio => "stdio",
            Mode::Http => "HTTP",
        }
    }
}

enum Run {
    Stdio(StdioRun),
    Http(HttpRun),
}

impl Run {
    fn session(&mut self, idx: usize) -> Box<dyn Session> {
        match self {
            Run::Stdio(r) => r.session(idx),
            Run::Http(r) => r.session(idx),
        }
    }
    fn pid(&self) -> u32 {
        match self {
            Run::Stdio(r) => r.child.id(),
            Run::Http(r) => r.child.id(),
        }
    }
    fn shutdown(self) -> Delivery {
        match self {
            Run::Stdio(r) => r.shutdown(),
            Run::Http(r) => r.shutdown(),
        }
    }
}

struct Report {
    mode: Mode,
    requests: u64,
    clients: usize,
    seconds: f64,
    tally: Tally,
    delivery: Delivery,
    /// Usage before the model was loaded, at the start, at the end, after the model's unload.
    empty: [Usage; 2],
    before: [Usage; 2],
    after: [Usage; 2],
    unloaded: [Usage; 2],
    rss_before: Rss,
    rss_after: Rss,
    model_before: String,
    model_after: String,
    failures: Vec<String>,
}

fn run_mode(mode: Mode, requests: u64, clients: usize, seed: u64, root: &Path) -> Report {
    println!(
        "== {}: {requests} requests from {clients} clients ==",
        mode.name()
    );
    let mut run = match mode {
        Mode::Stdio => Run::Stdio(StdioRun::start(root, clients + 1)),
        Mode::Http => Run::Http(HttpRun::start(root)),
    };
    let pid = run.pid();
    // The control session, for setup and read-outs, is the last index.
    let mut control = run.session(clients);
    clear_caches(control.as_mut());
    let empty = DEVICES.map(|d| usage(control.as_mut(), d));
    let m = must_answer::<ModelLoad>(
        control.as_mut(),
        &format!(r#"{{"model_name":"{MODEL_NAME}","path":"{MODEL_FILE}","device_id":"shm"}}"#),
    );
    assert_eq!(m.state, ModelState::Loaded, "{m:?}");
    let model_before = model_state(control.as_mut());
    clear_caches(control.as_mut());
    let before = DEVICES.map(|d| usage(control.as_mut(), d));
    let rss_before = Rss::read(pid);

    let sessions: Vec<_> = (0..clients).map(|i| run.session(i)).collect();
    let progress = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let mut tally = Tally::new();
    let started = Instant::now();
    let seconds = std::thread::scope(|scope| {
        let progress = &progress;
        let done = &done;
        scope.spawn(move || {
            let mut last = (Instant::now(), 0);
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.0.elapsed() >= Duration::from_secs(10) {
                    let n = progress.load(Ordering::Relaxed);
                    let rate = (n - last.1) as f64 / last.0.elapsed().as_secs_f64();
                    let rss = Rss::read(pid);
                    println!(
                        "  {}: {n} requests answered, {rate:.0} req/s over the last 10 s; RSS {:.1} MiB, less lazily freed pages {:.1} MiB",
                        mode.name(),
                        mib(rss.vm_rss),
                        mib(rss.effective())
                    );
                    last = (Instant::now(), n);
                }
            }
        });
        let handles: Vec<_> = sessions
            .into_iter()
            .enumerate()
            .map(|(i, session)| {
                let quota =
                    requests / clients as u64 + u64::from((i as u64) < requests % clients as u64);
                std::thread::Builder::new()
                    .name(format!("client-{i}"))
                    .spawn_scoped(scope, move || {
                        let mut c = Client {
                            idx: i,
                            session,
                            tally: Tally::new(),
                            progress,
                        };
                        if let Err(e) =
                            c.run(quota, seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d))
                        {
                            c.tally.aborted = Some(format!("client {i}: {e}"));
                        }
                        c.tally
                    })
                    .unwrap()
            })
            .collect();
        for h in handles {
            tally.merge(h.join().expect("client thread"));
        }
        let seconds = started.elapsed().as_secs_f64();
        done.store(true, Ordering::Relaxed);
        seconds
    });

    // Read-outs: with the model (as at the start), then without it (as before it was loaded),
    // each after handing the page cache back.
    let model_after = model_state(control.as_mut());
    clear_caches(control.as_mut());
    let after = DEVICES.map(|d| usage(control.as_mut(), d));
    let rss_after = Rss::read(pid);
    let unload = control
        .call(
            "memory.model_unload",
            &format!(r#"{{"model_name":"{MODEL_NAME}"}}"#),
        )
        .expect("memory.model_unload");
    clear_caches(control.as_mut());
    let unloaded = DEVICES.map(|d| usage(control.as_mut(), d));
    drop(control);
    let delivery = run.shutdown();

    let mut failures = Vec::new();
    if let Some(a) = &tally.aborted {
        failures.push(format!("a client stopped early: {a}"));
    }
    if delivery.lost > 0 || delivery.duplicated > 0 || delivery.unknown > 0 {
        failures.push(format!(
            "delivery: {} lost, {} duplicated, {} unknown responses",
            delivery.lost, delivery.duplicated, delivery.unknown
        ));
    }
    if delivery.answered != delivery.sent {
        failures.push(format!(
            "{} requests sent, {} answered",
            delivery.sent, delivery.answered
        ));
    }
    if !delivery.clean_exit {
        failures.push("the coordinator did not exit with status 0".into());
    }
    if let Some(n) = tally.errors.get("INTERNAL_ERROR") {
        failures.push(format!("{n} INTERNAL_ERROR answers"));
    }
    let other: u64 = tally
        .errors
        .iter()
        .filter(|(k, _)| *k != "INTERNAL_ERROR")
        .map(|(_, v)| v)
        .sum();
    if other > 0 {
        failures.push(format!(
            "{other} unexpected error answers: {:?}",
            tally.errors
        ));
    }
    if tally.violations > 0 {
        failures.push(format!("{} protocol violations", tally.violations));
    }
    let unload_ok = unload["success"] == Value::Bool(true);
    let evictable = small_budget();
    if !(unload_ok || evictable && unload["error_code"] == "MODEL_NOT_FOUND") {
        failures.push(format!("memory.model_unload at the end: {unload}"));
    }
    // The strict check: with the model gone and the cache handed back, every figure is what it
    // was before the model was loaded.
    for (i, dev) in DEVICES.iter().enumerate() {
        let (b, a) = (empty[i], unloaded[i]);
        if a != b {
            failures.push(format!(
                "{dev} did not return to its start: allocated {} -> {} B, allocation_count {} -> {}, reserved {} -> {} B (before the model was loaded -> after it was unloaded)",
                b.allocated, a.allocated, b.count, a.count, b.reserved, a.reserved
            ));
        }
    }
    // With the model where it was at the start, the figures are those of the start too.
    if model_after == model_before {
        for (i, dev) in DEVICES.iter().enumerate() {
            let (b, a) = (before[i], after[i]);
            if a != b {
                failures.push(format!(
                    "{dev} with the model: allocated {} -> {} B, allocation_count {} -> {}, reserved {} -> {} B",
                    b.allocated, a.allocated, b.count, a.count, b.reserved, a.reserved
                ));
            }
        }
    } else if !evictable {
        failures.push(format!(
            "the model moved: {model_before} at the start, {model_after} at the end"
        ));
    }
    let growth = rss_after.effective() as i64 - rss_before.effective() as i64;
    if growth > RSS_GROWTH_LIMIT {
        failures.push(format!(
            "RSS (less lazily freed pages) grew by {:.1} MiB, over the {} MiB allowed",
            growth as f64 / f64::from(1 << 20),
            RSS_GROWTH_LIMIT >> 20
        ));
    }
    let report = Report {
        mode,
        requests,
        clients,
        seconds,
        tally,
        delivery,
        empty,
        before,
        after,
        unloaded,
        rss_before,
        rss_after,
        model_before,
        model_after,
        failures,
    };
    print_report(&report);
    report
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e3
}

fn print_report(r: &Report) {
    let t = &r.tally;
    let cleanup = t.by_op.get(&Op::Cleanup).map_or(0, |e| e.0.len());
    println!(
        "{}: {} requests ({} of the mix, {} asked for, + {cleanup} cleanup frees) from {} clients in {:.2} s: {:.0} req/s",
        r.mode.name(),
        t.requests,
        t.requests - cleanup,
        r.requests,
        r.clients,
        r.seconds,
        t.requests as f64 / r.seconds
    );
    println!(
        "latency (µs): p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        us(&t.all, 0.5),
        us(&t.all, 0.9),
        us(&t.all, 0.99),
        us(&t.all, 0.999),
        t.all.max() as f64 / 1e3
    );
    println!(
        "  {:<20} {:>9} {:>9} {:>6} {:>10} {:>10} {:>10}",
        "action", "requests", "ok", "OOM", "p50 µs", "p99 µs", "max µs"
    );
    for (op, (h, ok, oom)) in &t.by_op {
        println!(
            "  {:<20} {:>9} {:>9} {:>6} {:>10.1} {:>10.1} {:>10.1}",
            op.name(),
            h.len(),
            ok,
            oom,
            us(h, 0.5),
            us(h, 0.99),
            h.max() as f64 / 1e3
        );
    }
    println!(
        "outcomes: ok {}, OUT_OF_MEMORY {}, model_acquire of an evicted model {}, other errors {:?}, protocol violations {}",
        t.ok, t.oom, t.model_gone, t.errors, t.violations
    );
    let d = &r.delivery;
    println!(
        "delivery: {} requests sent (setup and read-outs included), {} answered, {} lost, {} duplicated, {} unknown; clean exit: {}",
        d.sent, d.answered, d.lost, d.duplicated, d.unknown, d.clean_exit
    );
    for (i, dev) in DEVICES.iter().enumerate() {
        let f = |u: Usage| format!("{}/{}/{}", u.allocated, u.count, u.reserved);
        println!(
            "{dev} allocated/allocation_count/reserved (after ClearCache): before the model {}, start {}, end {}, after the model's unload {}; leaked {} B",
            f(r.empty[i]),
            f(r.before[i]),
            f(r.after[i]),
            f(r.unloaded[i]),
            r.unloaded[i].allocated as i64 - r.empty[i].allocated as i64
        );
    }
    println!(
        "model: {} at the start, {} at the end",
        r.model_before, r.model_after
    );
    let (b, a) = (r.rss_before, r.rss_after);
    println!(
        "RSS: {:.1} -> {:.1} MiB ({:+.1} MiB); shmem {:.1} -> {:.1} MiB; lazily freed (MADV_FREE, still counted) {:.1} -> {:.1} MiB; RSS less those {:.1} -> {:.1} MiB ({:+.1} MiB)",
        mib(b.vm_rss),
        mib(a.vm_rss),
        mib(a.vm_rss) - mib(b.vm_rss),
        mib(b.rss_shmem),
        mib(a.rss_shmem),
        mib(b.lazy_free),
        mib(a.lazy_free),
        mib(b.effective()),
        mib(a.effective()),
        mib(a.effective()) - mib(b.effective())
    );
    if a.effective() > b.effective() + (16 << 20) && r.failures.is_empty() {
        println!(
            "warning: RSS grew by more than 16 MiB (allocator fragmentation, within the 64 MiB allowed)"
        );
    }
    for s in t.samples.iter().chain(&d.samples) {
        println!("  note: {s}");
    }
    if r.failures.is_empty() {
        println!("{}: PASS", r.mode.name());
    } else {
        for f in &r.failures {
            println!("{}: FAIL: {f}", r.mode.name());
        }
    }
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let num = |name: &str, default: u64| {
        arg(name).map_or(default, |v| {
            v.replace(['_', ','], "")
                .parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {v}"))
        })
    };
    let quick = args.iter().any(|a| a == "--quick");
    let requests = num("--requests", if quick { 50_000 } else { 1_000_000 });
    let clients = num("--clients", 32) as usize;
    let seed = num("--seed", 0x6d65_6d63_6f6f_7264);
    if let Some(b) = arg("--budget") {
        BUDGET.set(b.clone()).unwrap();
    }
    assert!(
        clients >= 1 && requests >= clients as u64,
        "need at least one request per client"
    );
    let mode = arg("--mode").map(String::as_str).or_else(|| {
        args.iter()
            .map(String::as_str)
            .find(|a| matches!(*a, "stdio" | "http" | "both"))
    });
    let modes = match mode.unwrap_or("both") {
        "stdio" => vec![Mode::Stdio],
        "http" => vec![Mode::Http],
        "both" => vec![Mode::Stdio, Mode::Http],
        other => panic!("--mode: stdio, http or both, not {other}"),
    };

    let root: PathBuf =
        std::env::temp_dir().join(format!("memcoord-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("create the model root");
    write_model(&root);
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!(
        "memcoord load generator: {BIN}, {cpus} CPU(s), seed {seed:#x}, budgets cpu = shm = {}, model root {}",
        BUDGET.get().map_or("1GiB", String::as_str),
        root.display()
    );
    println!();

    let reports: Vec<Report> = modes
        .into_iter()
        .map(|m| run_mode(m, requests, clients, seed, &root))
        .collect();
    let _ = std::fs::remove_dir_all(&root);

    println!(
        "| mode | requests | clients | wall | throughput | p50 | p90 | p99 | max | OUT_OF_MEMORY | other errors | lost | duplicated | leaked bytes (cpu + shm) | reserved after ClearCache | RSS start → end |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &reports {
        let t = &r.tally;
        let leaked: i64 = (0..2)
            .map(|i| r.unloaded[i].allocated as i64 - r.empty[i].allocated as i64)
            .sum();
        let reserved_back = (0..2).all(|i| {
            r.unloaded[i].reserved == r.empty[i].reserved
                && (r.model_after != r.model_before || r.after[i].reserved == r.before[i].reserved)
        });
        let errors: u64 = t.errors.values().sum();
        println!(
            "| {} | {} | {} | {:.1} s | {:.0} req/s | {:.0} µs | {:.0} µs | {:.0} µs | {:.1} ms | {} | {} | {} | {} | {} | {} | {:.1} → {:.1} MiB |",
            r.mode.name(),
            t.requests,
            r.clients,
            r.seconds,
            t.requests as f64 / r.seconds,
            us(&t.all, 0.5),
            us(&t.all, 0.9),
            us(&t.all, 0.99),
            t.all.max() as f64 / 1e6,
            t.oom,
            errors,
            r.delivery.lost,
            r.delivery.duplicated,
            leaked,
            if reserved_back {
                "back to start"
            } else {
                "NOT back"
            },
            mib(r.rss_before.vm_rss),
            mib(r.rss_after.vm_rss)
        );
    }
    let failed: Vec<_> = reports
        .iter()
        .flat_map(|r| {
            r.failures
                .iter()
                .map(move |f| format!("{}: {f}", r.mode.name()))
        })
        .collect();
    assert!(failed.is_empty(), "load run failed:\n{}", failed.join("\n"));
}
