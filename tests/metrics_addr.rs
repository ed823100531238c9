//! `memcoord worker --metrics-addr` off loopback (issue 19, item 9): refused without a token,
//! exactly as `serve --listen` is; with `--token-file`, `/metrics` requires the token.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{BIN, http_request};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BUDGETS: [&str; 5] = ["--no-gpu", "--budget", "cpu=64MiB", "--budget", "shm=64MiB"];

#[test]
fn an_open_metrics_address_needs_a_token() {
    // Without a token: a usage error before anything starts, in serve's words.
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let out = Command::new(BIN)
            .arg("worker")
            .args(BUDGETS)
            .args(["--metrics-addr", addr])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{addr}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--metrics-addr")
                && err.contains("is not a loopback address: a bearer token is required")
                && err.contains("--token-file"),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "nothing on stdout: {out:?}");
        let serve = Command::new(BIN)
            .arg("serve")
            .args(BUDGETS)
            .args(["--listen", addr])
            .output()
            .unwrap();
        assert_eq!(serve.status.code(), Some(2));
        let serve_err = String::from_utf8_lossy(&serve.stderr);
        let rule = "is not a loopback address: a bearer token is required to listen there (--token-file FILE)";
        assert!(
            err.contains(rule) && serve_err.contains(rule),
            "{err}\n{serve_err}"
        );
    }
    // Loopback needs none.
    let mut child = Command::new(BIN)
        .arg("worker")
        .args(BUDGETS)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let port = metrics_port(&mut child);
    assert_eq!(http_request(port, "GET", "/metrics", &[], None).status, 200);
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());

    // With a token: it starts, and /metrics wants the token (not /healthz).
    let dir = std::env::temp_dir().join(format!("memcoord-metrics-addr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "m3trics-token\n").unwrap();
    let mut child = Command::new(BIN)
        .arg("worker")
        .args(BUDGETS)
        .args(["--metrics-addr", "0.0.0.0:0", "--token-file"])
        .arg(&token_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let port = metrics_port(&mut child);
    let no_token = http_request(port, "GET", "/metrics", &[], None);
    assert_eq!(no_token.status, 401);
    assert_eq!(no_token.json()["error_code"], "UNAUTHORIZED");
    let wrong = http_request(
        port,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer nope")],
        None,
    );
    assert_eq!(wrong.status, 401);
    let ok = http_request(
        port,
        "GET",
        "/metrics",
        &[("Authorization", "Bearer m3trics-token")],
        None,
    );
    assert_eq!(ok.status, 200);
    assert!(ok.body.contains("memcoord_"), "{}", ok.body);
    assert_eq!(http_request(port, "GET", "/healthz", &[], None).status, 200);
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());

    // An empty token file is refused, as serve refuses it.
    std::fs::write(&token_file, "\n").unwrap();
    let out = Command::new(BIN)
        .arg("worker")
        .args(BUDGETS)
        .args(["--metrics-addr", "0.0.0.0:0", "--token-file"])
        .arg(&token_file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the file is empty"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The port of `memcoord: metrics on http://ADDR:PORT/metrics` on the child's stderr.
fn metrics_port(child: &mut std::process::Child) -> u16 {
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("memcoord: metrics on http://") {
            let port = rest
                .trim_end_matches("/metrics")
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no port in {line}"));
            // Keep draining stderr so the child never blocks on it.
            std::thread::spawn(move || for _ in lines {});
            return port;
        }
    }
    panic!("the worker did not say where its metrics are");
}
