//! The claim socket (the contract's section 8.3) as a server: clients that send garbage, too
//! much, half a line or nothing are answered (or dropped) without holding up anyone else; the
//! HTTP server serves claims too; and the processes (`memcoord worker`, `memcoord serve`)
//! remove the socket when they end, by end of input or by a signal. The claimant here is a
//! process of its own for the spawned ones, as a worker of the host would be.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // test code: recvmsg and memory maps of its own (tests/common/claim.rs)

mod common;
use common::Scratch;

use common::claim::{Claim, Mapped, claim, claim_export, claim_raw, connect, receive};
use common::inproc::{InProcessServer, InProcessWorker};
use common::{Allocate, Requests, Server, Worker, map, pattern};
use memcoord::api::actions::export::Export;
use memcoord::protocol::ExportInfo;
use memcoord::transport::claim::{CLAIM_IO_TIMEOUT, MAX_CLAIM_LINE};
use memcoord::transport::server::ServeOptions;
use serde_json::json;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn refused_with(c: &Claim, code: &str) -> String {
    assert_eq!(c.error_code(), Some(code), "{}", c.line);
    assert!(c.fds.is_empty(), "a refusal passes no descriptor");
    c.line["error_message"].as_str().unwrap().to_string()
}

/// An shm allocation of `size` bytes filled with `pattern(seed)`, exported.
fn exported(w: &mut impl Requests, size: u64, seed: u64) -> ExportInfo {
    let a = w
        .send::<Allocate>(json!({"device_id": "shm", "size_bytes": size}))
        .unwrap()
        .allocation;
    let h = a.handle.unwrap();
    map(&h.path)[h.offset as usize..(h.offset + size) as usize]
        .copy_from_slice(&pattern(seed, size as usize));
    w.send::<Export>(json!({"allocation_id": a.allocation_id}))
        .unwrap()
}

fn check_bytes(c: &Claim, info: &ExportInfo, seed: u64) {
    let m = Mapped::new(c);
    let a = &info.allocations[0];
    let got = &m.bytes()[a.offset as usize..(a.offset + a.size_bytes) as usize];
    assert!(got == pattern(seed, a.size_bytes as usize), "bytes differ");
}

#[test]
fn bad_clients_are_answered_and_never_hold_up_a_good_one() {
    let mut w = InProcessWorker::small();
    let info = exported(&mut w, 20_000, 1);
    let socket = info.socket_path.as_str();

    // Silent, and half a line: they stay connected while everything below is served.
    let started = Instant::now();
    let silent: Vec<_> = (0..8).map(|_| connect(socket)).collect();
    let half = connect(socket);
    (&half).write_all(br#"{"export_id": ""#).unwrap();

    let e = refused_with(&claim_raw(socket, b"hello\n"), "INVALID_REQUEST");
    assert!(e.contains("export_id"), "{e}");
    refused_with(&claim_raw(socket, b"[1, 2]\n"), "INVALID_REQUEST");
    refused_with(
        &claim_raw(socket, b"{\"export_id\": 5, \"secret\": \"x\"}\n"),
        "INVALID_PARAMETER",
    );
    refused_with(&claim_raw(socket, b"{}\n"), "INVALID_PARAMETER");
    // Over the limit, with and without a newline, and a megabyte the server stops reading.
    let long = format!("{}\n", "x".repeat(MAX_CLAIM_LINE));
    refused_with(&claim_raw(socket, long.as_bytes()), "REQUEST_TOO_LARGE");
    refused_with(
        &claim_raw(socket, &vec![b'{'; 1 << 20]),
        "REQUEST_TOO_LARGE",
    );
    // A valid claim padded to the limit still fits when its newline is within it.
    let padded = json!({"export_id": info.export_id, "secret": "wrong"}).to_string();
    let padded = format!("{padded:<width$}\n", width = MAX_CLAIM_LINE - 1);
    assert_eq!(padded.len(), MAX_CLAIM_LINE);
    refused_with(&claim_raw(socket, padded.as_bytes()), "EXPORT_NOT_FOUND");
    // Connect and leave at once: nothing to answer, nothing breaks.
    drop(connect(socket));

    // The good claim, meanwhile: CRLF ends a line too.
    let line = format!(
        "{}\r\n",
        json!({"export_id": info.export_id, "secret": info.secret})
    );
    let good = claim_raw(socket, line.as_bytes());
    assert_eq!(good.error_code(), None, "{}", good.line);
    check_bytes(&good, &info, 1);

    // The silent ones were not answered yet (unless this machine took the whole time limit).
    if started.elapsed() < CLAIM_IO_TIMEOUT - Duration::from_secs(1) {
        for s in &silent {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            let r = (&*s).read(&mut b);
            assert!(
                matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                "a silent client was answered early: {r:?}"
            );
            s.set_nonblocking(false).unwrap();
        }
    }
    // After the time limit, each is told why and closed.
    for s in silent.iter().chain([&half]) {
        let e = refused_with(&receive(s), "INVALID_REQUEST");
        assert!(e.contains("within"), "{e}");
    }

    // A claim with no newline, ended by closing the write side, is a claim.
    let second = w
        .send::<Export>(json!({"allocation_id": info.allocations[0].allocation_id}))
        .unwrap();
    let s = connect(socket);
    (&s).write_all(
        json!({"export_id": second.export_id, "secret": second.secret})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let c = receive(&s);
    assert_eq!(c.error_code(), None, "{}", c.line);

    // A client that claims and never reads: the answer waits in its buffer; others go on.
    let third = w
        .send::<Export>(json!({"allocation_id": info.allocations[0].allocation_id}))
        .unwrap();
    let deaf = connect(socket);
    (&deaf)
        .write_all(
            format!(
                "{}\n",
                json!({"export_id": third.export_id, "secret": third.secret})
            )
            .as_bytes(),
        )
        .unwrap();
    let fourth = w
        .send::<Export>(json!({"allocation_id": info.allocations[0].allocation_id}))
        .unwrap();
    let c = claim_export(&fourth);
    assert_eq!(c.error_code(), None, "{}", c.line);
    drop(deaf);
}

#[test]
fn the_http_server_serves_claims_and_removes_its_socket_when_stopped() {
    let mut s = InProcessServer::start("64MiB", "64MiB", |svc| svc, ServeOptions::default());
    let a = s.post(
        "/v1/allocations",
        &json!({"device_id": "shm", "size_bytes": 9_000}),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let a = a.json()["data"]["allocation"].clone();
    let (path, off) = (
        a["handle"]["path"].as_str().unwrap().to_string(),
        a["handle"]["offset"].as_u64().unwrap() as usize,
    );
    map(&path)[off..off + 9_000].copy_from_slice(&pattern(4, 9_000));
    let x = s.post("/v1/exports", &json!({"allocation_id": a["allocation_id"]}));
    assert_eq!(x.status, 200, "{}", x.body);
    let info: ExportInfo = serde_json::from_value(x.json()["data"].clone()).unwrap();
    check_bytes(&claim_export(&info), &info, 4);
    let listed = s.get("/v1/exports").json();
    assert_eq!(listed["data"]["exports"][0]["claimed"], json!(true));
    let gone = s.request(
        "DELETE",
        &format!("/v1/exports/{}", info.export_id),
        &[],
        None,
    );
    assert_eq!(gone.status, 200, "{}", gone.body);
    assert_eq!(gone.json()["data"]["allocation_count"], json!(1));
    let again = s.request(
        "DELETE",
        &format!("/v1/exports/{}", info.export_id),
        &[],
        None,
    );
    assert_eq!(again.status, 404);
    assert_eq!(again.json()["error_code"], json!("EXPORT_NOT_FOUND"));

    let later = s.post("/v1/exports", &json!({"allocation_id": a["allocation_id"]}));
    let later: ExportInfo = serde_json::from_value(later.json()["data"].clone()).unwrap();
    let socket = PathBuf::from(&later.socket_path);
    assert!(socket.exists());
    s.stop();
    assert!(!socket.exists(), "removed when the server stops");
    assert!(!socket.parent().unwrap().exists());
    assert!(s.service.list_exports().exports.is_empty());
}

fn spawned_worker(run: &Scratch) -> Worker {
    Worker::spawn_with_env(
        &["--no-gpu", "--budget", "cpu=64MiB", "--budget", "shm=64MiB"],
        &[("XDG_RUNTIME_DIR", run.0.to_str().unwrap())],
    )
}

#[test]
fn a_worker_process_is_claimed_from_here_and_removes_its_socket_at_eof_and_on_sigterm() {
    for by_signal in [false, true] {
        let run = Scratch::new(if by_signal { "term" } else { "eof" });
        let mut w = spawned_worker(&run);
        let info = exported(&mut w, 300_000, 6);
        let unclaimed = w
            .send::<Export>(json!({"allocation_id": info.allocations[0].allocation_id}))
            .unwrap();
        let socket = PathBuf::from(&info.socket_path);
        assert!(
            socket.starts_with(&run.0),
            "under XDG_RUNTIME_DIR: {socket:?}"
        );
        assert_eq!(entries(&run), 1);
        // Claimed by this process from the worker process: the descriptors cross for real.
        let c = claim_export(&info);
        check_bytes(&c, &info, 6);

        let status = if by_signal {
            // SAFETY: kill(2) on our own child's pid.
            assert_eq!(unsafe { libc::kill(w.pid() as i32, libc::SIGTERM) }, 0);
            w.wait_exit(Duration::from_secs(20))
        } else {
            w.close(Duration::from_secs(20))
        };
        assert!(status.success(), "{status:?}");
        assert!(!socket.exists(), "the claim socket is removed");
        assert_eq!(entries(&run), 0, "and its directory");
        // The session ended, and its exports with it: nothing answers for them any more.
        assert!(std::os::unix::net::UnixStream::connect(&unclaimed.socket_path).is_err());
        // The claimant's descriptor still holds the file it mapped.
        check_bytes(&c, &info, 6);
    }
}

#[test]
fn a_worker_killed_with_sigkill_leaves_its_directory_and_the_next_one_removes_it() {
    let run = Scratch::new("kill");
    let mut w = spawned_worker(&run);
    let info = exported(&mut w, 4096, 8);
    w.kill();
    let left = PathBuf::from(&info.socket_path);
    assert!(left.exists(), "SIGKILL gives no chance to clean up");
    // Something that is not a claim socket's directory stays, whatever its name.
    let other = run.0.join("memcoord-1-x");
    std::fs::create_dir(&other).unwrap();
    let mut next = spawned_worker(&run);
    let mine = exported(&mut next, 4096, 9);
    assert!(
        !left.parent().unwrap().exists(),
        "the stale directory is removed"
    );
    assert!(other.exists());
    assert!(Path::new(&mine.socket_path).exists());
    assert!(next.close(Duration::from_secs(20)).success());
    assert_eq!(entries(&run), 1, "only the unrelated directory is left");
}

#[test]
fn a_server_process_removes_its_claim_socket_on_sigterm() {
    let run = Scratch::new("serve");
    let s = Server::spawn_with(
        &["--no-gpu", "--budget", "cpu=64MiB", "--budget", "shm=64MiB"],
        &[("XDG_RUNTIME_DIR", run.0.to_str().unwrap())],
        std::process::Stdio::inherit,
    );
    let a = s.post(
        "/v1/allocations",
        &json!({"device_id": "shm", "size_bytes": 4096}),
    );
    let id = a.json()["data"]["allocation"]["allocation_id"].clone();
    let x = s.post("/v1/exports", &json!({"allocation_id": id}));
    assert_eq!(x.status, 200, "{}", x.body);
    let info: ExportInfo = serde_json::from_value(x.json()["data"].clone()).unwrap();
    assert!(Path::new(&info.socket_path).starts_with(&run.0));
    assert_eq!(
        claim(&info.socket_path, &info.export_id, &info.secret)
            .fds
            .len(),
        1
    );
    let mut s = s;
    s.signal(libc::SIGTERM);
    assert!(s.wait_exit(Duration::from_secs(20)).success());
    assert_eq!(
        entries(&run),
        0,
        "the claim socket and its directory are gone"
    );
}

/// How many entries `dir` holds.
fn entries(dir: &Scratch) -> usize {
    std::fs::read_dir(&dir.0).unwrap().count()
}
