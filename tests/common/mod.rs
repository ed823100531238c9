//! A test harness that spawns the real `memcoord worker` and talks NDJSON to it.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // test code: libc calls and memory maps of its own

pub mod claim;
pub mod faulty;
pub mod inproc;

pub use memcoord::api::ActionSpec;
#[allow(unused_imports)] // each test binary uses some
pub use memcoord::api::actions::{
    allocate::Allocate, analytics::Analytics, clear::Clear, deallocate::Deallocate,
    defragment::Defragment, get_allocations::GetAllocations, get_pressure::GetPressure,
    get_status::GetStatus, get_transfer::GetTransfer, get_usage::GetUsage,
    list_devices::ListDevices, model_acquire::ModelAcquire, model_load::ModelLoad,
    model_optimize::ModelOptimize, model_release::ModelRelease, model_status::ModelStatus,
    model_unload::ModelUnload, optimization_recs::OptimizationRecs, optimize::Optimize,
    transfer::Transfer,
};
#[allow(unused_imports)]
pub use memcoord::protocol::{ErrorCode, ProtocolError};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_memcoord");

/// Maps a shm allocation's file (as another process would, through its handle's path).
pub fn map(path: &str) -> memmap2::MmapMut {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    // SAFETY: test code; the worker follows the handle protocol while we hold the mapping.
    unsafe { memmap2::MmapMut::map_mut(&f).unwrap() }
}

/// Bytes of a repeatable pseudo-random pattern (xorshift), for byte-for-byte checks.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Anything that answers protocol requests: the spawned worker, the in-process one.
pub trait Requests {
    /// Sends a request and waits for its answer envelope.
    fn request(&mut self, action: &str, data: Value) -> Value;

    /// Data of a successful answer; panics with the error otherwise.
    fn ok(&mut self, action: &str, data: Value) -> Value {
        let v = self.request(action, data);
        assert_eq!(v["success"], json!(true), "{action} failed: {v}");
        v["data"].clone()
    }

    /// The error code and message of a failed answer.
    fn err(&mut self, action: &str, data: Value) -> (String, String) {
        let v = self.request(action, data);
        assert_eq!(v["success"], json!(false), "{action} should fail: {v}");
        (
            v["error_code"].as_str().unwrap().to_string(),
            v["error_message"].as_str().unwrap().to_string(),
        )
    }

    /// The typed answer to the action `A` (e.g. `ask::<Allocate>(&request)`): the request
    /// written as the client writes it, carried through the transport and the dispatcher, its
    /// answer read as a host reads it. The error of the contract when it is refused.
    fn ask<A: ActionSpec>(&mut self, request: &A::Request) -> Result<A::Response, ProtocolError> {
        let data = serde_json::to_value(request).unwrap();
        self.send::<A>(data)
    }

    /// [`Requests::ask`] with `data` written as JSON (as a host writes it): its typed answer.
    fn send<A: ActionSpec>(&mut self, data: Value) -> Result<A::Response, ProtocolError> {
        let v = self.request(A::NAME, data);
        check_envelope(&v);
        typed::<A>(v)
    }

    /// `memory.get_usage` of a device, typed.
    fn stats(&mut self, device: &str) -> memcoord::protocol::MemoryUsageStats {
        self.send::<GetUsage>(json!({"device_id": device})).unwrap()
    }

    /// `memory.get_usage` of a device.
    fn usage(&mut self, device: &str) -> Value {
        self.ok("memory.get_usage", json!({"device_id": device}))
    }

    /// Allocates `size` bytes of General memory on `device`; returns its id.
    fn allocate(&mut self, device: &str, size: u64) -> String {
        self.send::<Allocate>(json!({"device_id": device, "size_bytes": size}))
            .unwrap_or_else(|e| panic!("memory.allocate failed: {e}"))
            .allocation
            .allocation_id
    }
}

/// The typed reading of an answer envelope to `A`: its `data` as `A`'s response, or its error.
pub fn typed<A: ActionSpec>(v: Value) -> Result<A::Response, ProtocolError> {
    if v["success"] == json!(true) {
        return Ok(serde_json::from_value(v["data"].clone())
            .unwrap_or_else(|e| panic!("{}: not its answer ({e}): {v}", A::NAME)));
    }
    let code = v["error_code"].as_str().unwrap();
    let code = ErrorCode::ALL
        .iter()
        .find(|c| c.as_str() == code)
        .unwrap_or_else(|| panic!("{}: an error code outside the contract: {v}", A::NAME));
    Err(ProtocolError::new(
        *code,
        v["error_message"].as_str().unwrap().to_string(),
    ))
}

impl Requests for Worker {
    fn request(&mut self, action: &str, data: Value) -> Value {
        Worker::request(self, action, data)
    }
}

pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<Value>,
    /// Responses received but not yet asked for, by request id ("" for null ids).
    stash: HashMap<String, Vec<Value>>,
    next_id: u64,
}

/// Every response must carry all six envelope fields with the right types.
pub fn check_envelope(v: &Value) {
    let o = v.as_object().expect("response is an object");
    assert_eq!(o.len(), 6, "exactly six fields: {v}");
    let ok = o["success"].as_bool().expect("success is a bool");
    assert!(o["request_id"].is_string() || o["request_id"].is_null());
    let status = o["status_code"]
        .as_u64()
        .expect("status_code is an integer");
    if ok {
        assert_eq!(status, 200);
        assert!(o["error_code"].is_null() && o["error_message"].is_null());
    } else {
        assert!(o["data"].is_null());
        assert!(
            o["error_code"].is_string() && o["error_message"].is_string(),
            "{v}"
        );
        assert!(!o["error_message"].as_str().unwrap().is_empty());
    }
}

impl Worker {
    pub fn spawn(args: &[&str]) -> Worker {
        let mut cmd = Command::new(BIN);
        cmd.arg("worker").args(args);
        Worker::spawn_command(cmd)
    }

    /// A worker with extra environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Worker {
        let mut cmd = Command::new(BIN);
        cmd.arg("worker").args(args).envs(env.iter().copied());
        Worker::spawn_command(cmd)
    }

    /// A worker started by `cmd` (e.g. a shell that moves itself into a cgroup and then
    /// execs `memcoord worker`), talked to over its stdin and stdout.
    pub fn spawn_command(mut cmd: Command) -> Worker {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn memcoord worker");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Worker {
            child,
            stdin,
            rx,
            stash: HashMap::new(),
            next_id: 0,
        }
    }

    /// A worker with small budgets (cpu 64 MiB, shm 64 MiB).
    pub fn small() -> Worker {
        Worker::spawn(&["--budget", "cpu=64MiB", "--budget", "shm=64MiB"])
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Sends a request and returns its id without waiting.
    pub fn submit(&mut self, action: &str, data: Value) -> String {
        self.next_id += 1;
        let id = format!("req-{}", self.next_id);
        let line = json!({"request_id": id, "action": action, "data": data}).to_string();
        self.send_raw(format!("{line}\n").as_bytes());
        id
    }

    /// Waits for the response to `id` (`""` = a response with a null id).
    pub fn wait_for(&mut self, id: &str, timeout: Duration) -> Value {
        if let Some(v) = self
            .stash
            .get_mut(id)
            .and_then(|q| (!q.is_empty()).then(|| q.remove(0)))
        {
            return v;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    check_envelope(&v);
                    let rid = v["request_id"].as_str().unwrap_or("").to_string();
                    if rid == id {
                        return v;
                    }
                    self.stash.entry(rid).or_default().push(v);
                }
                Err(RecvTimeoutError::Timeout) => panic!("no response to {id} within {timeout:?}"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("worker closed stdout before answering {id}")
                }
            }
        }
    }

    /// Whether a response to `id` arrived within `timeout`.
    pub fn answered_within(&mut self, id: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stash.get(id).is_some_and(|q| !q.is_empty()) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    check_envelope(&v);
                    let rid = v["request_id"].as_str().unwrap_or("").to_string();
                    self.stash.entry(rid).or_default().push(v);
                }
                Err(_) => return false,
            }
        }
    }

    pub fn request(&mut self, action: &str, data: Value) -> Value {
        let id = self.submit(action, data);
        let v = self.wait_for(&id, Duration::from_secs(20));
        assert_eq!(v["request_id"], json!(id));
        v
    }

    /// SIGKILL: the worker gets no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Closes stdin and waits for the exit status (failing after `timeout`).
    pub fn close(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.stdin.take();
        self.wait_exit(timeout)
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("worker did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Drains every response still to come (after close).
    pub fn remaining(&mut self) -> Vec<Value> {
        let mut out: Vec<Value> = self.stash.drain().flat_map(|(_, v)| v).collect();
        while let Ok(v) = self.rx.recv_timeout(Duration::from_secs(5)) {
            check_envelope(&v);
            out.push(v);
        }
        out
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the worker has ended (killed by a signal, say), without waiting.
    pub fn wait_exit_now(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for Worker {
    /// Closes stdin so the worker cleans up (removing its shm file), killing it only if it
    /// has not exited within two seconds.
    fn drop(&mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a safetensors file of `tensors` (name, element count of f32); returns each tensor's bytes.
pub fn write_model(path: &Path, tensors: &[(&str, usize)]) -> HashMap<String, Vec<u8>> {
    let mut bytes = HashMap::new();
    for (i, (name, n)) in tensors.iter().enumerate() {
        bytes.insert(name.to_string(), pattern(i as u64 + 1, n * 4));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, n)| {
            (
                name.to_string(),
                TensorView::new(Dtype::F32, vec![*n], &bytes[*name]).unwrap(),
            )
        })
        .collect();
    let data = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, data).unwrap();
    bytes
}

/// A fresh directory under the system's temp dir, removed (with what is in it) when dropped.
/// The name is short (`mc-TAG-PID-N`): sockets made in it must fit a socket address.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    /// A new empty directory named after `tag`.
    pub fn new(tag: &str) -> Scratch {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mc-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `memcoord serve` child on a free loopback port, and a tiny HTTP/1.1 client for it.
pub struct Server {
    child: Child,
    pub port: u16,
}

/// An HTTP answer.
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port` (its inode in
/// /proc/net/tcp, in LISTEN state, is one of the process's descriptors).
pub fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let wanted = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 9 && f[1] == wanted && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// One HTTP/1.1 request on a fresh connection.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpAnswer {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    text.push_str("\r\n");
    if let Some(b) = body {
        text.push_str(b);
    }
    stream.write_all(text.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    HttpAnswer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Server {
    /// Starts `memcoord serve --listen 127.0.0.1:PORT ARGS` and waits until it listens.
    pub fn spawn(args: &[&str]) -> Server {
        Server::spawn_with(args, &[], Stdio::inherit)
    }

    /// [`Server::spawn`] with environment variables set and stderr sent to what `stderr` makes.
    /// The port is one the system just gave out; tests run in parallel, so another test's
    /// server may take it first. So "listening" means that this child holds the listening
    /// socket of the port (not merely that something answers there), and a child that could
    /// not bind it is started again on another port.
    pub fn spawn_with(args: &[&str], env: &[(&str, &str)], stderr: impl Fn() -> Stdio) -> Server {
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new(BIN)
                .arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .args(args)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr())
                .spawn()
                .expect("spawn memcoord serve");
            let mut server = Server { child, port };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if listens_on(server.child.id(), port) {
                    return server;
                }
                if server.child.try_wait().unwrap().is_some() {
                    break; // it could not bind the port: another server has it
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        panic!("memcoord serve did not start listening");
    }

    /// A client of an already running server (for other threads).
    pub fn client(port: u16) -> ServerClient {
        ServerClient { port }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> HttpAnswer {
        http_request(self.port, method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> HttpAnswer {
        self.request("GET", path, &[], None)
    }

    pub fn post(&self, path: &str, body: &Value) -> HttpAnswer {
        self.request("POST", path, &[], Some(&body.to_string()))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(self.child.id() as i32, sig) };
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of a server started elsewhere.
pub struct ServerClient {
    pub port: u16,
}

impl ServerClient {
    pub fn post(&self, path: &str, body: &Value) -> HttpAnswer {
        http_request(self.port, "POST", path, &[], Some(&body.to_string()))
    }
}

/// A worker (cpu and shm 64 MiB each, no GPU) keeping persistent shm allocations in `dir`,
/// with extra environment variables.
pub fn state_dir_worker(dir: &Path, env: &[(&str, &str)]) -> Worker {
    Worker::spawn_with_env(
        &[
            "--no-gpu",
            "--budget",
            "cpu=64MiB",
            "--budget",
            "shm=64MiB",
            "--state-dir",
            dir.to_str().unwrap(),
        ],
        env,
    )
}

/// Allocates `size` bytes on shm (purpose `p<seed>`) and fills them with `pattern(seed)`
/// through the handle, as a client would; returns (id, path, offset).
pub fn filled_shm(w: &mut Worker, size: u64, persistent: bool, seed: u64) -> (String, String, u64) {
    let a = w
        .send::<Allocate>(
            json!({"device_id": "shm", "size_bytes": size, "persistent": persistent, "purpose": format!("p{seed}")}),
        )
        .unwrap()
        .allocation;
    let handle = a.handle.unwrap();
    let (path, offset) = (handle.path, handle.offset);
    map(&path)[offset as usize..(offset + size) as usize]
        .copy_from_slice(&pattern(seed, size as usize));
    (a.allocation_id, path, offset)
}
