//! HTTP benchmarks of `memcoord serve`'s router (axum, HTTP/1.1 keep-alive, loopback), served
//! inside this process exactly as `memcoord serve` serves it (`http::serve_on`, hyper's HTTP/1.1
//! connections with the default timeouts, on a `tokio::net::TcpListener`):
//!
//! 1. `POST /v1/command` with `memory.get_usage` from 32 concurrent connections: requests per
//!    second and latency p50 / p99 / max (target: at least 50,000 requests/s with p99 at most
//!    5 ms); the same from 1 connection; and, as the baseline in the same run, the in-process
//!    dispatcher (`transport::lines::handle_line` of the same request line, one thread), so that the
//!    HTTP overhead shows as a ratio;
//! 2. `GET /v1/dashboard/state?buckets=256` with 100,000 live allocations (one connection):
//!    p50 / p99 / max and the response size (target: at most 50 ms), next to
//!    `MemoryService::dashboard_state(256)` called directly.
//!
//! The load client is written here on tokio: each connection is its own task with its own
//! `TcpStream`, sending a hand-written HTTP/1.1 request and reading the whole response (head up
//! to `\r\n\r\n`, then `Content-Length` bytes of body) before the next. A request's latency is
//! from before its write to after its last response byte. Every response must be HTTP 200 with
//! `"success":true`; the failures are counted and reported.
//!
//! The server and the client run on two separate tokio runtimes of 2 worker threads each, and
//! share the machine's cores: the figures are a lower bound of what a server with the cores to
//! itself does.
//!
//! Run: `cargo bench --bench http` (add `-- --quick` for a short run: 1 s measured instead of
//! 5 s, 10 dashboard requests instead of 50).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use memchr::memmem;
use memcoord::backends::CpuBackend;
use memcoord::dispatch::Dispatcher;
use memcoord::managers::DeviceSetup;
use memcoord::service::MemoryService;
use memcoord::transport::http::{HttpState, Timeouts, serve_on, serve_router};
use memcoord::transport::lines::handle_line;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

const USAGE_LINE: &str =
    r#"{"request_id":"r1","action":"memory.get_usage","data":{"device_id":"cpu"}}"#;
const LIVE: u64 = 100_000;
const WORKERS: usize = 2;
const CONNECTIONS: usize = 32;
const TARGET_RPS: f64 = 50_000.0;
const TARGET_P99_MS: f64 = 5.0;
const TARGET_DASHBOARD_MS: f64 = 50.0;

/// p50, p99 and max of durations in nanoseconds.
fn stats(mut ns: Vec<u64>) -> (f64, f64, f64) {
    assert!(!ns.is_empty(), "no samples");
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize] as f64;
    (at(0.5), at(0.99), ns[ns.len() - 1] as f64)
}

fn runtime(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
}

/// One keep-alive connection of the load client.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// What came back for one request.
struct Answer {
    status: u16,
    success: bool,
    body_len: usize,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(64 << 10),
        })
    }

    /// Reads more into the buffer; end of stream is an error here.
    async fn fill(&mut self) -> std::io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 16 << 10 {
            self.buf.reserve(64 << 10);
        }
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Writes `request` and reads its whole response.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<Answer> {
        self.stream.write_all(request).await?;
        let head_end = loop {
            if let Some(i) = memmem::find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| std::io::Error::other("response head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.strip_prefix("HTTP/1.1 "))
            .and_then(|l| l.get(..3))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
        let length = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .ok_or_else(|| std::io::Error::other(format!("no Content-Length in {head:?}")))?;
        while self.buf.len() < head_end + length {
            self.fill().await?;
        }
        let body = &self.buf[head_end..head_end + length];
        let success = memmem::find(body, b"\"success\":true").is_some();
        self.buf.drain(..head_end + length);
        Ok(Answer {
            status,
            success,
            body_len: length,
        })
    }
}

/// What a closed-loop load run measured.
struct Load {
    requests: u64,
    seconds: f64,
    latencies_ns: Vec<u64>,
    failures: u64,
    first_failure: Option<String>,
}

/// `connections` tasks on `client`, each sending `request` on its own connection one after the
/// other: `warmup` first (not recorded), then `measure`. Counts the requests started in the
/// measured window; the rate is that count over the window's first start to last end.
fn load(
    client: &Runtime,
    addr: SocketAddr,
    connections: usize,
    request: &[u8],
    warmup: Duration,
    measure: Duration,
) -> Load {
    let request: Arc<[u8]> = Arc::from(request);
    let failures = Arc::new(AtomicU64::new(0));
    client.block_on(async {
        let start = Instant::now() + Duration::from_millis(50);
        let measure_from = start + warmup;
        let measure_to = measure_from + measure;
        let tasks: Vec<_> = (0..connections)
            .map(|_| {
                let request = Arc::clone(&request);
                let failures = Arc::clone(&failures);
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(1 << 18);
                    let mut first_failure = None;
                    let mut fail = |why: String| {
                        failures.fetch_add(1, Ordering::Relaxed);
                        first_failure.get_or_insert(why);
                    };
                    let mut conn = Conn::connect(addr).await.expect("connect");
                    tokio::time::sleep_until(start.into()).await;
                    let mut last_end = measure_from;
                    loop {
                        let t = Instant::now();
                        if t >= measure_to {
                            break;
                        }
                        match conn.exchange(&request).await {
                            Ok(a) => {
                                let end = Instant::now();
                                if a.status != 200 || !a.success {
                                    fail(format!(
                                        "HTTP {} success={} ({} B body)",
                                        a.status, a.success, a.body_len
                                    ));
                                }
                                if t >= measure_from {
                                    latencies.push((end - t).as_nanos() as u64);
                                    last_end = end;
                                }
                            }
                            Err(e) => {
                                fail(format!("connection error: {e}"));
                                match Conn::connect(addr).await {
                                    Ok(c) => conn = c,
                                    Err(e) => {
                                        fail(format!("reconnect failed: {e}"));
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    (latencies, last_end, first_failure)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut last = measure_from;
        let mut first_failure = None;
        for t in tasks {
            let (l, end, f) = t.await.expect("client task");
            all.extend(l);
            last = last.max(end);
            if first_failure.is_none() {
                first_failure = f;
            }
        }
        Load {
            requests: all.len() as u64,
            seconds: (last - measure_from).as_secs_f64(),
            latencies_ns: all,
            failures: failures.load(Ordering::Relaxed),
            first_failure,
        }
    })
}

fn report_load(name: &str, l: Load) -> (f64, f64) {
    let rps = l.requests as f64 / l.seconds;
    let (p50, p99, max) = stats(l.latencies_ns);
    println!(
        "{name:<40} {rps:>9.0} req/s   p50 {:>7.1} µs   p99 {:>7.1} µs   max {:>8.1} µs   ({} requests in {:.2} s)",
        p50 / 1e3,
        p99 / 1e3,
        max / 1e3,
        l.requests,
        l.seconds
    );
    if l.failures > 0 {
        println!(
            "!!!!! {} FAILED REQUESTS in `{name}` (first: {}) !!!!!",
            l.failures,
            l.first_failure.unwrap_or_default()
        );
    }
    (rps, p99)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// The protocol's in-process path, one thread: requests per second over `duration`.
fn in_process(d: &Dispatcher, line: &[u8], duration: Duration) -> f64 {
    let mut out = Vec::with_capacity(4096);
    let check = |out: &mut Vec<u8>| {
        out.clear();
        assert!(handle_line(d, line, out, None).is_none(), "answered inline");
    };
    check(&mut out);
    assert!(
        memmem::find(&out, b"\"success\":true").is_some(),
        "{}",
        String::from_utf8_lossy(&out)
    );
    for _ in 0..10_000 {
        check(&mut out);
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < duration {
        for _ in 0..1000 {
            check(&mut out);
        }
        n += 1000;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs(if quick { 1 } else { 5 });
    let dashboard_runs = if quick { 10 } else { 50 };

    let budget = 1u64 << 30;
    let service = Arc::new(MemoryService::new(vec![DeviceSetup {
        backend: Box::new(CpuBackend::new(budget + budget / 4).expect("reserve address space")),
        budget,
        pinned: None,
    }]));

    let server = runtime("server");
    let client = runtime("client");
    let addr = {
        let state = Arc::new(HttpState::new(Arc::clone(&service), None, 1 << 20));
        let listener = server
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        server.spawn(async move {
            serve_on(
                listener,
                serve_router(state),
                Timeouts::default(),
                std::future::pending::<()>(),
            )
            .await;
        });
        addr
    };
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!(
        "== HTTP on {addr}: server runtime {WORKERS} worker threads, client runtime {WORKERS} \
         worker threads, sharing {cpus} CPU(s) ==",
    );
    println!(
        "   (warm-up {} s, measured {} s per run; HTTP/1.1 keep-alive, one connection per client task)",
        warmup.as_secs(),
        measure.as_secs()
    );

    // 1. get_usage.
    println!("== POST /v1/command memory.get_usage ==");
    let request = post("/v1/command", USAGE_LINE);
    let (rps32, p99_32) = report_load(
        &format!("HTTP, {CONNECTIONS} connections"),
        load(&client, addr, CONNECTIONS, &request, warmup, measure),
    );
    let (rps1, _) = report_load(
        "HTTP, 1 connection",
        load(&client, addr, 1, &request, warmup, measure),
    );
    let d = Dispatcher::new(Arc::clone(&service));
    let inproc = in_process(&d, USAGE_LINE.as_bytes(), measure);
    println!(
        "{:<40} {inproc:>9.0} req/s",
        "baseline: in-process handle_line, 1 thread"
    );
    println!(
        "   HTTP overhead: in-process is {:.1}x the {CONNECTIONS}-connection rate, {:.1}x the 1-connection rate",
        inproc / rps32,
        inproc / rps1
    );
    println!(
        "   target >= {TARGET_RPS:.0} req/s: {} ({rps32:.0}); p99 <= {TARGET_P99_MS} ms: {} ({:.2} ms)",
        verdict(rps32 >= TARGET_RPS),
        verdict(p99_32 / 1e6 <= TARGET_P99_MS),
        p99_32 / 1e6
    );

    // 2. The dashboard with LIVE allocations.
    let started = Instant::now();
    let mut out = Vec::with_capacity(1024);
    for i in 0..LIVE {
        let kind = ["General", "Cache", "Temporary", "Activations"][(i % 4) as usize];
        let size = 64 + (i * 997) % (4096 - 64 + 1);
        let line = format!(
            r#"{{"request_id":"a{i}","action":"memory.allocate","data":{{"device_id":"cpu","size_bytes":{size},"allocation_type":"{kind}","purpose":"layer{}"}}}}"#,
            i % 100
        );
        out.clear();
        assert!(
            handle_line(&d, line.as_bytes(), &mut out, None).is_none(),
            "answered inline"
        );
        assert!(
            memmem::find(&out, b"\"success\":true").is_some(),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
    println!(
        "== GET /v1/dashboard/state?buckets=256 with {LIVE} live allocations on cpu \
         (64..4096 B, 4 types; made in {:.1} s) ==",
        started.elapsed().as_secs_f64()
    );
    let request = get("/v1/dashboard/state?buckets=256");
    let (times, size, failures, first_failure) = client.block_on(async {
        let mut conn = Conn::connect(addr).await.expect("connect");
        let mut times = Vec::with_capacity(dashboard_runs);
        let mut size = 0;
        let mut failures = 0u64;
        let mut first_failure = None;
        for i in 0..=dashboard_runs {
            let t = Instant::now();
            let a = conn.exchange(&request).await.expect("dashboard request");
            let ns = t.elapsed().as_nanos() as u64;
            if a.status != 200 || !a.success {
                failures += 1;
                first_failure.get_or_insert(format!("HTTP {} success={}", a.status, a.success));
            }
            size = a.body_len;
            // The first one warms up.
            if i > 0 {
                times.push(ns);
            }
        }
        (times, size, failures, first_failure)
    });
    let (p50, p99, max) = stats(times);
    println!(
        "{:<40} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms   ({size} B body, {dashboard_runs} requests)",
        "HTTP GET, 1 connection",
        p50 / 1e6,
        p99 / 1e6,
        max / 1e6
    );
    if failures > 0 {
        println!(
            "!!!!! {failures} FAILED DASHBOARD REQUESTS (first: {}) !!!!!",
            first_failure.unwrap_or_default()
        );
    }
    let mut direct = Vec::with_capacity(dashboard_runs);
    for i in 0..=dashboard_runs {
        let t = Instant::now();
        let state = service.dashboard_state(256);
        let ns = t.elapsed().as_nanos() as u64;
        std::hint::black_box(&state);
        if i > 0 {
            direct.push(ns);
        }
    }
    let (d50, d99, dmax) = stats(direct);
    println!(
        "{:<40} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms",
        "service.dashboard_state(256) directly",
        d50 / 1e6,
        d99 / 1e6,
        dmax / 1e6
    );
    println!(
        "   target <= {TARGET_DASHBOARD_MS} ms over HTTP: {} (p99 {:.2} ms, max {:.2} ms)",
        verdict(max / 1e6 <= TARGET_DASHBOARD_MS),
        p99 / 1e6,
        max / 1e6
    );
    drop(client);
    server.shutdown_timeout(Duration::from_millis(100));
}
