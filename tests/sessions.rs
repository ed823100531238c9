//! Sessions and the Unix socket (the contract's section 8.1): each connection is a session,
//! and what a session holds (its non-persistent allocations, its leases) is released when it
//! ends, however it ends: the client closing, or the client process SIGKILLed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
mod common;
use common::Scratch;

use common::inproc::settings;
use common::{Worker, write_model};
use memcoord::dispatch::Dispatcher;
use memcoord::service::MemoryService;
use memcoord::transport::stdio::WorkerOptions;
use memcoord::transport::unix::UnixServer;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Polls `done` until it holds or `deadline` passes; whether it held.
fn poll_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One NDJSON connection to the socket.
struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next: u64,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap();
        Client {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            next: 0,
        }
    }

    fn send(&mut self, action: &str, data: Value) -> String {
        self.next += 1;
        let id = format!("c-{}", self.next);
        let line = json!({"request_id": id, "action": action, "data": data}).to_string();
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        id
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        assert!(
            self.reader.read_line(&mut line).unwrap() > 0,
            "connection closed"
        );
        serde_json::from_str(&line).unwrap()
    }

    fn request(&mut self, action: &str, data: Value) -> Value {
        let id = self.send(action, data);
        let v = self.read();
        assert_eq!(v["request_id"], json!(id));
        v
    }
}

fn in_process_socket(path: &Path) -> (Arc<MemoryService>, UnixServer, tokio::runtime::Runtime) {
    let service = Arc::new(MemoryService::new(
        settings("256MiB", "64MiB").devices().unwrap(),
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = UnixServer::bind(
        path,
        0o600,
        &Dispatcher::new(Arc::clone(&service)),
        runtime.handle(),
        &WorkerOptions::default(),
    )
    .unwrap();
    (service, server, runtime)
}

fn allocated(service: &MemoryService, device: &str) -> u64 {
    service
        .get_usage(&memcoord::api::DeviceRequest {
            device_id: device.into(),
        })
        .unwrap()
        .allocated_bytes
}

#[test]
fn thirty_two_clients_each_answered_exactly_once_and_nothing_leaks() {
    let dir = Scratch::new("32");
    let path = dir.0.join("mc.sock");
    let (service, server, _runtime) = in_process_socket(&path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is the owner's alone by default");
    const PAIRS: usize = 50;
    let clients: Vec<_> = (0..32)
        .map(|c| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(&path);
                // Every allocate sent before any answer is read: answered concurrently.
                let ids: Vec<String> = (0..PAIRS)
                    .map(|i| {
                        client.send(
                            "memory.allocate",
                            json!({"device_id": "cpu", "size_bytes": 4096 + c * 64 + i}),
                        )
                    })
                    .collect();
                let mut seen = std::collections::HashMap::new();
                let mut allocations = Vec::new();
                for _ in 0..PAIRS {
                    let v = client.read();
                    assert_eq!(v["success"], true, "{v}");
                    *seen
                        .entry(v["request_id"].as_str().unwrap().to_string())
                        .or_insert(0) += 1;
                    allocations.push(v["data"]["allocation"]["allocation_id"].clone());
                }
                let frees: Vec<String> = allocations
                    .iter()
                    .map(|a| client.send("memory.deallocate", json!({"allocation_id": a})))
                    .collect();
                for _ in 0..PAIRS {
                    let v = client.read();
                    assert_eq!(v["success"], true, "{v}");
                    *seen
                        .entry(v["request_id"].as_str().unwrap().to_string())
                        .or_insert(0) += 1;
                }
                for id in ids.iter().chain(&frees) {
                    assert_eq!(seen.get(id), Some(&1), "{id} answered exactly once");
                }
                assert_eq!(seen.len(), 2 * PAIRS, "no answer to a request never sent");
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(allocated(&service, "cpu"), 0, "nothing leaked");
    let deadline = Instant::now() + Duration::from_secs(5);
    assert!(
        poll_until(deadline, || service.list_sessions().sessions.is_empty()),
        "every connection's session ended"
    );
    server.stop();
    assert!(!path.exists(), "the socket file is removed at stop");
}

#[test]
fn a_closed_connection_releases_what_its_session_made_but_not_persistent_allocations() {
    let dir = Scratch::new("close");
    let path = dir.0.join("mc.sock");
    let (service, server, _runtime) = in_process_socket(&path);
    let mut a = Client::connect(&path);
    let mut b = Client::connect(&path);
    for persistent in [false, false, true] {
        let v = a.request(
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 1 << 20, "persistent": persistent}),
        );
        assert_eq!(v["success"], true, "{v}");
        assert_eq!(v["data"]["allocation"]["tenant"], "default");
        assert_eq!(
            v["data"]["allocation"]["client_pid"],
            json!(std::process::id()),
            "the peer's pid, from SO_PEERCRED"
        );
    }
    let kept = b.request(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 4096}),
    );
    let sessions = b.request("memory.list_sessions", json!(null))["data"]["sessions"].clone();
    let counts: Vec<(u64, u64)> = sessions
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert_eq!(s["transport"], "unix");
            (
                s["allocation_count"].as_u64().unwrap(),
                s["allocated_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(counts, vec![(3, 3 << 20), (1, 4096)], "oldest first");
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(1);
    assert!(
        poll_until(deadline, || allocated(&service, "cpu") == (1 << 20) + 4096),
        "within a second the closed session's two allocations are freed; its persistent one \
         and the other session's stay"
    );
    let listed = b.request(
        "memory.get_allocations",
        json!({"device_id": "cpu", "client_pid": std::process::id()}),
    );
    assert_eq!(listed["data"]["total_count"], 2, "{listed}");
    let other = b.request(
        "memory.get_allocations",
        json!({"device_id": "cpu", "tenant": "nobody"}),
    );
    assert_eq!(other["data"]["total_count"], 0);
    assert_eq!(kept["success"], true);
    drop(b);
    server.stop();
}

/// A client that goes away while one of its requests waits for memory: its allocations go
/// back within a second all the same (the waiting request does not hold the session open),
/// and the waiting request never allocates afterwards, even when room appears.
#[test]
fn a_session_ends_at_once_though_a_request_of_it_still_waits_for_memory() {
    let dir = Scratch::new("waiting");
    let path = dir.0.join("mc.sock");
    let (service, server, _runtime) = in_process_socket(&path);
    let mut other = Client::connect(&path);
    let big = other.request(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 200 << 20}),
    );
    assert_eq!(big["success"], true, "{big}");
    let mut gone = Client::connect(&path);
    let held = gone.request(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 1 << 20}),
    );
    assert_eq!(held["success"], true, "{held}");
    // 100 MiB do not fit beside the other session's 200 MiB (budget 256 MiB): it waits.
    gone.send(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 100 << 20, "timeout_seconds": 30}),
    );
    let sessions = |c: &mut Client| {
        c.request("memory.list_sessions", json!(null))["data"]["sessions"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(sessions(&mut other), 2);
    // Give the request time to start waiting.
    std::thread::sleep(Duration::from_millis(100));
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(1);
    assert!(
        poll_until(deadline, || allocated(&service, "cpu") == 200 << 20),
        "within a second of the close the gone session's allocation is freed, though a request \
         of it was waiting for memory"
    );
    assert_eq!(sessions(&mut other), 1, "only the other session is left");
    // Room appears: the gone session's waiting request must not take it.
    let freed = other.request(
        "memory.deallocate",
        json!({"allocation_id": big["data"]["allocation"]["allocation_id"]}),
    );
    assert_eq!(freed["success"], true, "{freed}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        allocated(&service, "cpu"),
        0,
        "nothing allocated for the gone session"
    );
    drop(other);
    server.stop();
}

/// The done-when of issue 15: a client process holding allocations and a lease over the Unix
/// socket is SIGKILLed; within one second its allocations and lease are gone and usage is back
/// where it was; its persistent allocation stays.
#[test]
fn a_sigkilled_client_loses_its_allocations_and_lease_within_a_second() {
    if Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_err()
    {
        println!("SKIPPED: python3 is missing (the client process this test kills)");
        return;
    }
    let dir = Scratch::new("kill");
    let sock = dir.0.join("mc.sock");
    write_model(&dir.0.join("m.safetensors"), &[("w", 4096)]);
    let mut w = Worker::spawn(&[
        "--budget",
        "cpu=64MiB",
        "--budget",
        "shm=64MiB",
        "--model-root",
        dir.0.to_str().unwrap(),
        "--unix",
        sock.to_str().unwrap(),
    ]);
    let loaded = w.request(
        "memory.model_load",
        json!({"model_name": "m", "path": "m.safetensors", "device_id": "cpu"}),
    );
    assert_eq!(loaded["success"], true, "{loaded}");
    let usage = |w: &mut Worker| {
        w.request("memory.get_usage", json!({"device_id": "cpu"}))["data"]["allocated_bytes"]
            .as_u64()
            .unwrap()
    };
    let before = usage(&mut w);
    let script = r#"
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
asks = [("memory.allocate", {"device_id": "cpu", "size_bytes": 1048576}),
        ("memory.allocate", {"device_id": "cpu", "size_bytes": 12345, "allocation_type": "Cache"}),
        ("memory.allocate", {"device_id": "cpu", "size_bytes": 8192, "persistent": True}),
        ("memory.model_acquire", {"model_name": "m"})]
for i, (action, data) in enumerate(asks):
    f.write(json.dumps({"request_id": str(i), "action": action, "data": data}) + "\n")
f.flush()
for _ in asks:
    print(f.readline().strip(), flush=True)
print("ready", flush=True)
time.sleep(600)
"#;
    let mut client = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let client_pid = client.id();
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut answers = std::collections::HashMap::new();
    loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the client ended early"
        );
        if line.trim() == "ready" {
            break;
        }
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["success"], true, "{v}");
        answers.insert(v["request_id"].as_str().unwrap().to_string(), v);
    }
    let lease_id = answers["3"]["data"]["lease_id"].clone();
    let persistent_id = answers["2"]["data"]["allocation"]["allocation_id"].clone();
    let sessions = w.request("memory.list_sessions", json!(null))["data"]["sessions"].clone();
    let mine = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["transport"] == "unix")
        .expect("the client's session is listed")
        .clone();
    assert_eq!(mine["client_pid"], json!(client_pid));
    assert_eq!(mine["allocation_count"], 3);
    assert_eq!(mine["allocated_bytes"], 1048576 + 12345 + 8192);
    assert_eq!(mine["lease_count"], 1);
    assert_eq!(usage(&mut w), before + 1048576 + 12345 + 8192);

    client.kill().unwrap();
    let killed = Instant::now();
    client.wait().unwrap();
    let deadline = killed + Duration::from_secs(1);
    let released = poll_until(deadline, || {
        let sessions = w.request("memory.list_sessions", json!(null));
        sessions["data"]["sessions"].as_array().unwrap().len() == 1
            && usage(&mut w) == before + 8192
    });
    assert!(
        released,
        "within one second of the SIGKILL the session ended and usage is back (+ the \
         persistent allocation), after {:?}",
        killed.elapsed()
    );
    let release = w.request("memory.model_release", json!({"lease_id": lease_id}));
    assert_eq!(
        release["error_code"], "LEASE_NOT_FOUND",
        "the lease is gone"
    );
    let left = w.request(
        "memory.get_allocations",
        json!({"device_id": "cpu", "client_pid": client_pid}),
    );
    assert_eq!(left["data"]["total_count"], 1, "{left}");
    assert_eq!(
        left["data"]["allocations"][0]["allocation_id"], persistent_id,
        "the persistent allocation stays"
    );
    let unload = w.request("memory.model_unload", json!({"model_name": "m"}));
    assert_eq!(
        unload["success"], true,
        "an unleased model unloads: {unload}"
    );
    assert!(w.close(Duration::from_secs(10)).success());
    assert!(!sock.exists(), "the socket file is removed at exit");
}

/// `memcoord serve --listen … --unix PATH`: the socket beside HTTP; `memcoord sessions` and
/// `memcoord allocs` show the connection's process; SIGTERM removes the socket.
#[test]
fn serve_with_a_socket_beside_http_shows_sessions_in_the_cli() {
    let dir = Scratch::new("serve");
    let sock = dir.0.join("mc.sock");
    let mut server = common::Server::spawn(&[
        "--budget",
        "cpu=64MiB",
        "--budget",
        "shm=64MiB",
        "--unix",
        sock.to_str().unwrap(),
        "--unix-mode",
        "660",
    ]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "--unix-mode widens the socket");
    let mut c = Client::connect(&sock);
    let a = c.request(
        "memory.allocate",
        json!({"device_id": "shm", "size_bytes": 65536}),
    );
    assert_eq!(a["success"], true, "{a}");
    let url = format!("http://127.0.0.1:{}", server.port);
    let pid = std::process::id().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(common::BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = run(&["sessions", "--url", &url]);
    assert!(table.starts_with("SESSION"), "{table}");
    assert!(table.contains(&pid) && table.contains("unix"), "{table}");
    let v: Value = serde_json::from_str(&run(&["sessions", "--url", &url, "--json"])).unwrap();
    assert_eq!(v["sessions"][0]["allocated_bytes"], 65536);
    let allocs = run(&["allocs", "--url", &url, "--device", "shm"]);
    assert!(allocs.contains("PID") && allocs.contains(&pid), "{allocs}");
    server.signal(15);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert!(!sock.exists(), "the socket file is removed at stop");
}
