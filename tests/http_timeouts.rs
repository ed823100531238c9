//! Slow and lying HTTP clients (issue 19, item 9): a client that sends part of a header, nothing
//! at all, or a body slower than the body timeout loses its connection (or gets an answer)
//! instead of holding it forever; a Content-Length over the body limit is refused at once,
//! before a byte of the body is read. The server runs in process (on a port-0 listener); the
//! flags' checks go through the binary.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::BIN;
use common::inproc::InProcessServer;
use memcoord::transport::server::{ServeOptions, Timeouts};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A server whose clients have a second for a header and a second for a body.
fn server() -> InProcessServer {
    InProcessServer::start(
        "64MiB",
        "64MiB",
        |s| s,
        ServeOptions {
            timeouts: Timeouts {
                header: Duration::from_secs(1),
                body: Duration::from_secs(1),
            },
            ..Default::default()
        },
    )
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads until the server closes the connection; what it sent, and how long that took.
fn read_until_closed(s: &mut TcpStream) -> (String, Duration) {
    let t = Instant::now();
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the connection was still open after {:?}: {e}", t.elapsed()),
    }
    (String::from_utf8_lossy(&raw).into_owned(), t.elapsed())
}

/// The status and the JSON body of one raw answer.
fn answer(raw: &str) -> (u16, Value) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}"));
    (status, body)
}

#[test]
fn slow_headers_idle_connections_and_slow_bodies_are_cut_off() {
    let s = server();

    // Half a header: closed once the header timeout (1 s) has passed, with no answer.
    let mut half = connect(s.port);
    half.write_all(b"POST /v1/command HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        .unwrap();
    // Nothing at all.
    let mut silent = connect(s.port);
    // Many idle connections (the probe held 3,000 open forever).
    let mut idle: Vec<TcpStream> = (0..200).map(|_| connect(s.port)).collect();
    let (got, waited) = read_until_closed(&mut half);
    assert!(got.is_empty(), "{got}");
    assert!(
        waited < Duration::from_secs(4),
        "half a header held the connection for {waited:?}"
    );
    let (_, waited) = read_until_closed(&mut silent);
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    for c in &mut idle {
        let (_, waited) = read_until_closed(c);
        assert!(waited < Duration::from_secs(4), "{waited:?}");
    }

    // A keep-alive connection idle after its answer is closed too.
    let mut kept = connect(s.port);
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let (got, waited) = read_until_closed(&mut kept);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("ok\n"), "{got}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "an idle keep-alive connection was closed after {waited:?}"
    );

    // A body slower than the body timeout: answered INVALID_REQUEST, connection closed.
    let mut slow = connect(s.port);
    slow.write_all(
        b"POST /v1/command HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"request_id\"",
    )
    .unwrap();
    let (got, waited) = read_until_closed(&mut slow);
    let (status, body) = answer(&got);
    assert_eq!(status, 400, "{got}");
    assert_eq!(body["error_code"], "INVALID_REQUEST");
    assert_eq!(body["status_code"], 400);
    assert!(
        body["error_message"]
            .as_str()
            .unwrap()
            .contains("did not arrive within 1s"),
        "{body}"
    );
    assert!(waited < Duration::from_secs(4), "{waited:?}");

    // The server still serves.
    let ok = s.get("/v1/devices");
    assert_eq!(ok.status, 200);
}

#[test]
fn a_content_length_over_the_limit_is_refused_before_the_body() {
    // Default timeouts (10 s header, 30 s body): the answer must not wait for either.
    let s = InProcessServer::start("64MiB", "64MiB", |s| s, ServeOptions::default());
    for (path, id) in [
        ("/v1/command", Value::Null),
        ("/v1/allocations", Value::from("huge-1")),
    ] {
        let mut c = connect(s.port);
        let t = Instant::now();
        c.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: huge-1\r\n\
                 Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let (got, _) = read_until_closed(&mut c);
        let (status, body) = answer(&got);
        assert_eq!(status, 413, "{got}");
        assert_eq!(body["error_code"], "REQUEST_TOO_LARGE");
        assert_eq!(body["status_code"], 413);
        assert_eq!(body["request_id"], id);
        assert!(body["data"].is_null());
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "413 took {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn timeouts_must_be_positive() {
    for (flag, value) in [
        ("--header-timeout-seconds", "0"),
        ("--body-timeout-seconds", "-1"),
        ("--header-timeout-seconds", "NaN"),
        ("--body-timeout-seconds", "1e9"),
    ] {
        let out = std::process::Command::new(BIN)
            .args(["serve", "--no-gpu", "--listen", "127.0.0.1:0"])
            .arg(format!("{flag}={value}"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{err}");
    }
}
