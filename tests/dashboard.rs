//! The web dashboard (`assets/dashboard.html`, served at `/` by `memcoord serve`) in a real
//! headless browser: the page must poll `/v1/dashboard/state` and draw a live allocation in its
//! device's table and memory map. A screenshot is kept at `target/test-artifacts/dashboard.png`
//! (and the DOM the scripts built at `target/test-artifacts/dashboard-dom.html`).
//!
//! The browser is `$CHROMIUM`, else the first of `chromium`, `chromium-browser`, `google-chrome`
//! that runs; without one the browser part is skipped (install Debian's `chromium`).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // test code: libc calls and memory maps of its own

mod common;

use common::inproc::InProcessServer;
use common::{Allocate, typed};
use memcoord::protocol::DashboardState;
use memcoord::transport::server::ServeOptions;
use serde::Deserialize;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);
const ALLOCATION_SIZE: u64 = 8 * 1024 * 1024;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path =
            std::env::temp_dir().join(format!("memcoord-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One HTTP/1.1 request (`Connection: close`); returns the status code and the body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    json_body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAccept: */*\r\n"
    );
    if let Some(body) = json_body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    if let Some(body) = json_body {
        request.push_str(body);
    }
    stream.write_all(request.as_bytes())?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_response(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let head_end = find(raw, b"\r\n\r\n").ok_or_else(|| {
        bad(format!(
            "no end of headers in {:?}",
            String::from_utf8_lossy(raw)
        ))
    })?;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let mut rest = &raw[head_end + 4..];
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line: {head}")))?;
    let mut chunked = false;
    let mut length = None;
    for line in head.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        } else if name == "content-length" {
            length = value.parse::<usize>().ok();
        }
    }
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let line_end = find(rest, b"\r\n").ok_or_else(|| bad("truncated chunk".into()))?;
            let size_text = String::from_utf8_lossy(&rest[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .map_err(|e| bad(format!("bad chunk size {size_text:?}: {e}")))?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size {
                return Err(bad("truncated chunk".into()));
            }
            out.extend_from_slice(&rest[..size]);
            rest = rest.get(size + 2..).unwrap_or(&[]);
        }
        out
    } else {
        match length {
            Some(n) if n <= rest.len() => rest[..n].to_vec(),
            _ => rest.to_vec(),
        }
    };
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// What a browser run left: its exit status (None when it was killed at the timeout), stdout
/// and stderr.
struct Run {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` in its own process group, killing the whole group (the browser's helper processes
/// too) if it runs past `timeout`.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> std::io::Result<Run> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    let pgid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        let _ = tx.send((true, buf));
    });
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        let _ = tx2.send((false, buf));
    });
    let kill_group = || {
        // SAFETY: kill(2) on the process group this function created; no memory is involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        // Kill the group before reaping its leader, so the group id can't have been reused.
        if Instant::now() >= deadline {
            kill_group();
            let _ = child.wait();
            break None;
        }
        match child.try_wait()? {
            Some(status) => break Some(status),
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        // Helpers that outlive the browser would hold the pipes open: give them a moment, then
        // end them (a group id stays reserved while the group has members).
        let got = match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(got) => got,
            Err(_) => {
                kill_group();
                match rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(got) => got,
                    Err(_) => break,
                }
            }
        };
        if got.0 {
            stdout = got.1;
        } else {
            stderr = got.1;
        }
    }
    Ok(Run {
        status,
        stdout: String::from_utf8_lossy(&stdout).to_string(),
        stderr: String::from_utf8_lossy(&stderr).to_string(),
    })
}

fn browser_runs(name: &str) -> bool {
    let mut cmd = Command::new(name);
    cmd.arg("--version");
    matches!(
        run_with_timeout(cmd, Duration::from_secs(30)),
        Ok(Run { status: Some(s), .. }) if s.success()
    )
}

/// `$CHROMIUM`, else the first of chromium, chromium-browser, google-chrome that runs.
fn find_browser() -> Option<String> {
    if let Ok(explicit) = std::env::var("CHROMIUM")
        && !explicit.is_empty()
    {
        assert!(
            browser_runs(&explicit),
            "CHROMIUM={explicit} does not run (`{explicit} --version` failed)"
        );
        return Some(explicit);
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| browser_runs(name))
        .map(str::to_string)
}

/// Runs the browser headless on `url` with `extra` flags, failing the test on a timeout or a
/// failed exit.
fn browser(browser: &str, extra: &[&str], url: &str) -> Run {
    let profile = TempDir::new("dashboard-chromium");
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg("--virtual-time-budget=5000")
    .args(extra)
    .arg(url);
    let run = run_with_timeout(cmd, BROWSER_TIMEOUT).expect("start the browser");
    match run.status {
        None => panic!(
            "{browser} {extra:?} ran past {BROWSER_TIMEOUT:?} and was killed; stderr:\n{}",
            run.stderr
        ),
        Some(s) if !s.success() => {
            panic!("{browser} {extra:?} failed ({s}); stderr:\n{}", run.stderr)
        }
        Some(_) => run,
    }
}

/// The DOM without its `<script>` elements (whose source names types and attributes too).
fn strip_scripts(dom: &str) -> String {
    let mut out = String::with_capacity(dom.len());
    let mut rest = dom;
    while let Some(start) = rest.find("<script") {
        out.push_str(&rest[..start]);
        match rest[start..].find("</script>") {
            Some(end) => rest = &rest[start + end + "</script>".len()..],
            None => {
                rest = "";
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The opening tags (`<div class="bucket" ...>`) of the elements with `class="bucket"` in
/// `html`.
fn bucket_tags(html: &str) -> Vec<&str> {
    html.match_indices("class=\"bucket\"")
        .filter_map(|(at, _)| {
            let start = html[..at].rfind('<')?;
            let end = at + html[at..].find('>')?;
            Some(&html[start..=end])
        })
        .collect()
}

fn title_of(tag: &str) -> Option<&str> {
    let start = tag.find("title=\"")? + "title=\"".len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

#[test]
fn dashboard_renders_a_live_allocation_in_a_browser() {
    // The server in process (the browser is what runs apart), as `memcoord serve --no-gpu
    // --budget cpu=64MiB --budget shm=64MiB` serves.
    let server = InProcessServer::start("64MiB", "64MiB", |svc| svc, ServeOptions::default());
    let port = server.port;
    let url = format!("http://127.0.0.1:{port}/");

    // The page itself.
    let (status, page) = http(port, "GET", "/", None).expect("GET /");
    assert_eq!(status, 200, "GET / answered {status}: {page}");
    assert!(
        page.contains("id=\"devices\"") && page.contains("memory-map"),
        "GET / is not the dashboard page:\n{page}"
    );

    // A live allocation on shm.
    let body = format!(
        r#"{{"device_id":"shm","size_bytes":{ALLOCATION_SIZE},"allocation_type":"Activations","purpose":"browser-test"}}"#
    );
    let (status, text) =
        http(port, "POST", "/v1/allocations", Some(&body)).expect("POST /v1/allocations");
    let envelope: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("POST /v1/allocations answered {status} with non-JSON ({e}): {text}")
    });
    let allocation_id = typed::<Allocate>(envelope)
        .unwrap_or_else(|e| panic!("allocation failed ({status}): {e}"))
        .allocation
        .allocation_id;

    // The state the page polls has it.
    let (status, text) =
        http(port, "GET", "/v1/dashboard/state?buckets=256", None).expect("GET state");
    let state: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("dashboard state answered {status} with non-JSON ({e}): {text}")
    });
    assert_eq!(
        state["success"],
        Value::Bool(true),
        "dashboard state failed ({status}): {state}"
    );
    let dashboard = DashboardState::deserialize(&state["data"])
        .unwrap_or_else(|e| panic!("not the dashboard's state ({e}): {state}"));
    let shm = dashboard
        .devices
        .iter()
        .find(|d| d.info.device_id == "shm")
        .unwrap_or_else(|| panic!("no shm device in the dashboard state: {state}"));
    assert!(
        shm.largest_allocations
            .iter()
            .any(|a| a.allocation_id == allocation_id),
        "the allocation is not among shm's largest allocations: {:?}",
        shm.largest_allocations
    );

    let Some(chromium) = find_browser() else {
        println!("skipping: no chromium found (install Debian's chromium)");
        return;
    };
    let artifacts = artifacts_dir();

    // The DOM after the page's scripts ran (a few polls in virtual time).
    let run = browser(&chromium, &["--dump-dom"], &url);
    std::fs::write(artifacts.join("dashboard-dom.html"), &run.stdout).expect("write DOM artifact");
    let dom = strip_scripts(&run.stdout);
    assert!(
        dom.contains("id=\"devices\""),
        "the browser's DOM is not the dashboard (stderr:\n{})\n{}",
        run.stderr,
        run.stdout
    );
    if let Some(at) = dom.find("id=\"banner\"") {
        let tag_end = at + dom[at..].find('>').unwrap_or(0);
        assert!(
            !dom[at..tag_end].contains("show"),
            "the page shows an error banner: {}",
            &dom[tag_end..(tag_end + 300).min(dom.len())]
        );
    }
    let card = dom
        .find("data-device-id=\"shm\"")
        .unwrap_or_else(|| panic!("no data-device-id=\"shm\" card in the DOM:\n{dom}"));
    let card_end = dom[card + 1..]
        .find("data-device-id=")
        .map_or(dom.len(), |i| card + 1 + i);
    let shm_card = &dom[card..card_end];

    let row_attr = format!("data-allocation-id=\"{allocation_id}\"");
    let row = shm_card
        .find(&row_attr)
        .unwrap_or_else(|| panic!("no element with {row_attr} in the shm card:\n{shm_card}"));
    let row_html = &shm_card[row..];
    let row_html = &row_html[..row_html.find("</tr>").unwrap_or(row_html.len())];
    assert!(
        row_html.contains(&format!(">{allocation_id}<")),
        "the allocation's row does not show its id as text: {row_html}"
    );

    let all_buckets = bucket_tags(&dom);
    assert!(
        all_buckets.len() >= 256,
        "expected at least 256 class=\"bucket\" elements, found {}",
        all_buckets.len()
    );
    let shm_buckets = bucket_tags(shm_card);
    assert!(
        shm_buckets.len() >= 256,
        "the shm card has {} buckets, expected 256",
        shm_buckets.len()
    );
    let activations: Vec<&str> = shm_buckets
        .iter()
        .filter_map(|tag| title_of(tag))
        .filter(|title| title.contains("Activations"))
        .collect();
    assert!(
        !activations.is_empty(),
        "no shm bucket's title mentions Activations; titles: {:?}",
        shm_buckets
            .iter()
            .filter_map(|t| title_of(t))
            .take(8)
            .collect::<Vec<_>>()
    );

    // A screenshot, kept as a test artifact.
    let png = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    let run = browser(
        &chromium,
        &[
            "--window-size=1400,1000",
            &format!("--screenshot={}", png.display()),
        ],
        &url,
    );
    let size = std::fs::metadata(&png)
        .unwrap_or_else(|e| {
            panic!(
                "no screenshot at {} ({e}); stderr:\n{}",
                png.display(),
                run.stderr
            )
        })
        .len();
    assert!(
        size > 10 * 1024,
        "screenshot {} is only {size} bytes",
        png.display()
    );
    println!(
        "dashboard screenshot: {} ({size} bytes); {} shm buckets with Activations",
        png.display(),
        activations.len()
    );
}
