//! The fuzzing harness of memcoord's request decoder and dispatcher, and its oracles.
//!
//! One file, used by the cargo-fuzz targets (through `fuzz/src/lib.rs`) and by the stable smoke
//! test `tests/fuzz_smoke.rs` (through `#[path]`), so that both check exactly the same rules. It
//! uses only crates that memcoord itself (or its dev-dependencies) has: memcoord, serde_json,
//! tokio and jsonschema.
//!
//! - [`check_decode`]: `parse_request` on any bytes must not panic, and what it accepts must be
//!   what serde_json reads from the same line.
//! - [`Harness::run_input`]: an input is one or more request lines (split on `\n`, a CR before
//!   it dropped, as the stdio transport frames them). Each line goes through
//!   `transport::lines::handle_line`; a `Pending` answer is run to completion on a tokio runtime. Every
//!   answer must be exactly one line holding a valid response envelope (six fields, the right
//!   types, `success` ⇔ no error code, `status_code` matching the code, the request's id echoed,
//!   no `INTERNAL_ERROR`, success data matching the action's schema in docs/protocol.schema.json).
//!   After the input, the service's books must agree with themselves ([`Harness::check_invariants`]).
//!
//! Concurrency, as the transports have it (they run pending answers on the runtime and go on
//! reading): a line that begins with `&` (the `&` is dropped) does not wait for its pending
//! answer; the answer is collected after the input's last line. A line that is just `~` pauses
//! [`PAUSE_MS`] (four times per input at most), so that what runs meanwhile gets somewhere (a
//! model load waiting for room looks again every 50 ms).
//!
//! Ids the fuzzer cannot guess: before a line is handled, `$A<d>` becomes the d-th allocation id
//! this input has seen (any answer's `allocation_id` or `destination_allocation_id`), `$U<d>` the
//! same id in upper case, `$L<d>` the d-th lease id and `$T<d>` the d-th transfer id (d modulo the
//! number seen; left as is while none has been seen).
//!
//! Requests that wait (an allocate without room waits up to `timeout_seconds`, 30 s by default;
//! a model load or acquire waits for room or for a load): the harness never cancels a pending
//! answer. When one is still pending and a request is waiting for memory (or after 40 ms
//! anyway), it makes room as a host would: every model unloaded with `force`, every device
//! cleared with `force`. A waiter then proceeds. An answer still pending after
//! [`HANG_LIMIT`] although room was made is reported as a hang (a panic).

use jsonschema::Validator;
use memcoord::api::Action;
use memcoord::config::Settings;
use memcoord::dispatch::{Dispatcher, InFlightLimit};
use memcoord::protocol::ErrorCode;
use memcoord::protocol::envelope::{MAX_REQUEST_ID_BYTES, parse_request};
use memcoord::service::MemoryService;
use memcoord::transport::lines::handle_line;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The devices the harness's service has, with their budgets.
pub const DEVICES: [&str; 2] = ["cpu", "shm"];
/// Each device's budget (as the brief asks: `cpu=64MiB`, `shm=64MiB`).
pub const BUDGET: u64 = 64 << 20;
/// How long a pending answer may take, room being made all along, before it is a hang.
pub const HANG_LIMIT: Duration = Duration::from_secs(20);
/// How long a `~` line pauses.
pub const PAUSE_MS: u64 = 30;
/// How long a pending answer runs before the harness makes room anyway (model loads and
/// acquires wait without showing in `waiting_requests`).
pub const RELIEF_AFTER: Duration = Duration::from_millis(40);
/// Lines of one input handled at most (the rest is ignored), to bound an input's cost.
pub const MAX_LINES: usize = 32;

/// Every action of the contract.
pub const ACTIONS: [&str; 20] = [
    "memory.list_devices",
    "memory.get_status",
    "memory.get_usage",
    "memory.get_allocations",
    "memory.allocate",
    "memory.deallocate",
    "memory.clear",
    "memory.defragment",
    "memory.optimize",
    "memory.transfer",
    "memory.get_transfer",
    "memory.model_load",
    "memory.model_unload",
    "memory.model_acquire",
    "memory.model_release",
    "memory.model_status",
    "memory.model_optimize",
    "memory.get_pressure",
    "memory.analytics",
    "memory.optimization_recs",
];

fn show(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.chars().count() > 2000 {
        let head: String = text.chars().take(2000).collect();
        format!("{head}… ({} bytes)", bytes.len())
    } else {
        format!("{text:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// The decoder.

/// `parse_request` on any bytes: never a panic; an accepted line is a JSON object whose
/// `request_id`, `action` and `data` are what `parse_request` returned; a refused line is
/// INVALID_REQUEST, with an id only where the line had a valid one.
pub fn check_decode(line: &[u8]) {
    match parse_request(line) {
        Ok(r) => {
            assert!(
                !r.request_id.is_empty() && r.request_id.len() <= MAX_REQUEST_ID_BYTES,
                "accepted a request_id of {} bytes: {}",
                r.request_id.len(),
                show(line)
            );
            // serde_json reads the line as an object of raw values: the same fields. (Not as
            // a Value: serde_json checks numbers' range, \u escapes and nesting depth only
            // when it builds values, and parse_request keeps `data` raw, for the action's own
            // parsing to refuse or ignore what is in it.)
            let text = std::str::from_utf8(line)
                .unwrap_or_else(|_| panic!("accepted a line that is not UTF-8: {}", show(line)));
            let o: HashMap<String, &RawValue> = serde_json::from_str(text).unwrap_or_else(|e| {
                panic!(
                    "accepted a line that is not a JSON object ({e}): {}",
                    show(line)
                )
            });
            let string = |k: &str| {
                o.get(k)
                    .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
            };
            assert_eq!(
                string("request_id").as_deref(),
                Some(&*r.request_id),
                "request_id differs from serde_json's: {}",
                show(line)
            );
            assert_eq!(
                string("action").as_deref(),
                Some(&*r.action),
                "action differs from serde_json's: {}",
                show(line)
            );
            match r.data {
                None => assert!(
                    o.get("data").is_none_or(|d| d.get() == "null"),
                    "data dropped: {}",
                    show(line)
                ),
                Some(raw) => {
                    assert!(
                        raw.get().starts_with('{'),
                        "data is not an object: {}",
                        show(line)
                    );
                    assert_eq!(
                        o.get("data").map(|d| d.get()),
                        Some(raw.get()),
                        "data differs: {}",
                        show(line)
                    );
                }
            }
        }
        Err(e) => {
            assert_eq!(e.error.code, ErrorCode::InvalidRequest, "{}", show(line));
            assert!(!e.error.message.is_empty());
            if let Some(id) = &e.request_id {
                assert!(
                    !id.is_empty() && id.len() <= MAX_REQUEST_ID_BYTES,
                    "{}",
                    show(line)
                );
                if let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(line) {
                    assert_eq!(
                        o.get("request_id").and_then(Value::as_str),
                        Some(&**id),
                        "refused with another id than the line's: {}",
                        show(line)
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Model files for `memory.model_load`.

fn safetensors(tensors: &[(&str, usize)]) -> (Vec<u8>, u64) {
    let mut header = String::from("{");
    let mut offset = 0u64;
    for (i, (name, floats)) in tensors.iter().enumerate() {
        let len = *floats as u64 * 4;
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{floats}],\"data_offsets\":[{offset},{}]}}",
            offset + len
        ));
        offset += len;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    (out, offset)
}

/// Writes a safetensors file whose tensor bytes are a hole (zeros, no disk).
fn write_model(path: &Path, tensors: &[(&str, usize)]) {
    let (head, data) = safetensors(tensors);
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&head).unwrap();
    f.set_len(head.len() as u64 + data).unwrap();
}

/// The model root: files of every kind `memory.model_load` meets. Named after the process, so
/// that folders of processes that are gone can be removed.
fn make_model_root() -> PathBuf {
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("memcoord-fuzz-models-"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let root = tmp.join(format!("memcoord-fuzz-models-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("sub")).unwrap();
    write_model(&root.join("tiny.safetensors"), &[("a", 16), ("b", 256)]);
    write_model(&root.join("sub/tiny.safetensors"), &[("w", 1024)]);
    write_model(&root.join("small.safetensors"), &[("w", 256 << 10)]);
    write_model(&root.join("empty.safetensors"), &[("none", 0), ("one", 1)]);
    write_model(
        &root.join("big.safetensors"),
        &[("x", 3 << 20), ("y", 1 << 20)],
    );
    write_model(&root.join("huge.safetensors"), &[("z", 20 << 20)]);
    std::fs::write(
        root.join("broken.safetensors"),
        b"\x10\0\0\0\0\0\0\0{\"a\":",
    )
    .unwrap();
    std::fs::write(root.join("short.safetensors"), b"\x01").unwrap();
    let _ = std::os::unix::fs::symlink("/etc/hostname", root.join("escape.safetensors"));
    let _ = std::os::unix::fs::symlink("tiny.safetensors", root.join("link.safetensors"));
    root
}

// ---------------------------------------------------------------------------------------------
// The dispatcher.

/// Ids seen in this input's answers, for the `$A0`-style placeholders.
#[derive(Default, Debug)]
struct Ids {
    allocations: Vec<String>,
    leases: Vec<String>,
    transfers: Vec<String>,
}

impl Ids {
    fn harvest(&mut self, v: &Value) {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    if let Some(s) = x.as_str() {
                        let list = match k.as_str() {
                            "allocation_id" | "destination_allocation_id" => &mut self.allocations,
                            "lease_id" => &mut self.leases,
                            "transfer_id" => &mut self.transfers,
                            _ => continue,
                        };
                        if list.len() < 32 && !list.iter().any(|x| x == s) {
                            list.push(s.to_string());
                        }
                    } else {
                        self.harvest(x);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| self.harvest(x)),
            _ => {}
        }
    }

    /// The line with its placeholders replaced.
    fn substitute(&self, line: &[u8]) -> Vec<u8> {
        if !line.contains(&b'$') {
            return line.to_vec();
        }
        let mut out = Vec::with_capacity(line.len() + 64);
        let mut i = 0;
        while i < line.len() {
            if line[i] == b'$' && i + 2 < line.len() && line[i + 2].is_ascii_digit() {
                let n = (line[i + 2] - b'0') as usize;
                let (list, upper) = match line[i + 1] {
                    b'A' => (&self.allocations, false),
                    b'U' => (&self.allocations, true),
                    b'L' => (&self.leases, false),
                    b'T' => (&self.transfers, false),
                    _ => {
                        out.push(line[i]);
                        i += 1;
                        continue;
                    }
                };
                if !list.is_empty() {
                    let id = &list[n % list.len()];
                    if upper {
                        out.extend_from_slice(id.to_ascii_uppercase().as_bytes());
                    } else {
                        out.extend_from_slice(id.as_bytes());
                    }
                    i += 3;
                    continue;
                }
            }
            out.push(line[i]);
            i += 1;
        }
        out
    }
}

/// Counts, for reports.
#[derive(Default, Debug)]
pub struct Stats {
    /// Inputs run.
    pub inputs: AtomicU64,
    /// Request lines handled.
    pub lines: AtomicU64,
    /// Successful answers.
    pub successes: AtomicU64,
    /// Answers that came as `Pending`.
    pub pending: AtomicU64,
    /// Times room was made for a waiting answer.
    pub reliefs: AtomicU64,
    /// Answers `TOO_MANY_REQUESTS` (the in-flight bound reached).
    pub refused_in_flight: AtomicU64,
}

/// An answer now, or one still running.
enum Answer {
    Now(Vec<u8>),
    Later(tokio::task::JoinHandle<Vec<u8>>),
}

/// A service with small budgets, its dispatcher, a runtime for pending answers, and the
/// schema of every action's response.
pub struct Harness {
    rt: tokio::runtime::Runtime,
    service: Arc<MemoryService>,
    dispatcher: Dispatcher,
    /// The bound on the inputs' requests in flight, as a transport sets one per session (the
    /// harness's own requests are not bounded). Small, so that inputs reach it.
    limit: Arc<InFlightLimit>,
    responses: HashMap<&'static str, Validator>,
    model_root: PathBuf,
    next_id: AtomicU64,
    /// Counts so far.
    pub stats: Stats,
}

/// The in-flight bound of the inputs' requests.
const IN_FLIGHT: usize = 8;

/// A failure of a response rule: what is wrong, the request line and the answer.
fn fail(what: impl std::fmt::Display, line: &[u8], answer: &[u8]) -> ! {
    panic!(
        "{what}\n  request: {}\n  answer:  {}",
        show(line),
        show(answer)
    )
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// A fresh service (`cpu` and `shm`, 64 MiB each, no GPU) with a model root of test files.
    pub fn new() -> Harness {
        let mut s = Settings::default();
        s.set_budget("cpu=64MiB").expect("budget");
        s.set_budget("shm=64MiB").expect("budget");
        s.no_gpu = true;
        let model_root = make_model_root();
        let service = Arc::new(
            MemoryService::new(s.host_devices().expect("host devices"))
                .with_model_root(&model_root)
                // Chunked copies even for a few MiB.
                .with_transfer_chunk_bytes(1 << 20),
        );
        service.start_keep_alive_sweeper();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(64)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let schema = memcoord::transport::openapi::stdio_schema();
        let responses = ACTIONS
            .iter()
            .map(|&action| {
                let mut s = schema.clone();
                let o = s.as_object_mut().unwrap();
                o.remove("oneOf");
                o.insert("$ref".into(), json!(format!("#/$defs/response:{action}")));
                let v = jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft202012)
                    .build(&s)
                    .expect("response schema");
                (action, v)
            })
            .collect();
        Harness {
            rt,
            dispatcher: Dispatcher::new(Arc::clone(&service)),
            limit: InFlightLimit::new(IN_FLIGHT),
            service,
            responses,
            model_root,
            next_id: AtomicU64::new(0),
            stats: Stats::default(),
        }
    }

    /// Handles a line of the harness's own and returns its successful answer's data.
    fn call(&self, action: &str, data: Value) -> Value {
        let id = format!("~harness-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let line = json!({"request_id": id, "action": action, "data": data}).to_string();
        let answer = self.answer(line.as_bytes());
        let v = self.check_envelope(line.as_bytes(), &answer, false);
        if v["success"] != json!(true) {
            fail(
                format!("the harness's own {action} failed"),
                line.as_bytes(),
                &answer,
            );
        }
        v["data"].clone()
    }

    /// Whether a request is waiting for memory on some device.
    fn someone_waits(&self) -> bool {
        let d = self.call("memory.get_pressure", Value::Null);
        d["devices"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p["waiting_requests"].as_u64() != Some(0)))
    }

    /// Makes room as a host would: every model unloaded with force, every device cleared with
    /// force.
    pub fn relieve(&self) {
        let models = self.call("memory.model_status", Value::Null);
        for m in models["models"].as_array().into_iter().flatten() {
            let name = m["model_name"].as_str().unwrap_or_default();
            let id = format!("~harness-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
            let line = json!({"request_id": id, "action": "memory.model_unload",
                "data": {"model_name": name, "force": true}})
            .to_string();
            // MODEL_NOT_FOUND when the sweeper or a waiter got there first.
            let answer = self.answer(line.as_bytes());
            self.check_response(line.as_bytes(), &answer);
        }
        for d in DEVICES {
            self.call("memory.clear", json!({"device_id": d, "force": true}));
        }
    }

    /// Hands a line to the dispatcher: its answer now, or its pending answer started on the
    /// runtime (as the transports run them). An input's line (`bounded`) counts against the
    /// in-flight bound.
    fn start(&self, line: &[u8], bounded: bool) -> Answer {
        let mut out = Vec::new();
        let pending = if bounded {
            handle_line(
                &self.dispatcher,
                line,
                &mut out,
                Some(&|| self.limit.admit()),
            )
        } else {
            handle_line(&self.dispatcher, line, &mut out, None)
        };
        match pending {
            None => Answer::Now(out),
            Some(p) => {
                if !out.is_empty() {
                    fail("a pending answer also wrote inline", line, &out);
                }
                let expected = parse_request(line).ok().map(|r| r.request_id.into_owned());
                if expected.as_deref() != Some(p.request_id.as_str()) {
                    fail(
                        format!("Pending.request_id {:?} is not the request's", p.request_id),
                        line,
                        b"",
                    );
                }
                self.stats.pending.fetch_add(1, Ordering::Relaxed);
                Answer::Later(self.rt.spawn(p.response))
            }
        }
    }

    /// Waits for a pending answer, making room while a request waits for it (or every 40 ms).
    fn wait(&self, mut handle: tokio::task::JoinHandle<Vec<u8>>, line: &[u8]) -> Vec<u8> {
        let started = Instant::now();
        let mut relieved = started;
        loop {
            let r = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(2), &mut handle).await
            });
            match r {
                Ok(Ok(bytes)) => return bytes,
                Ok(Err(e)) => fail(
                    format!(
                        "the pending answer panicked ({e}); the transport would answer INTERNAL_ERROR"
                    ),
                    line,
                    b"",
                ),
                Err(_) => {}
            }
            if started.elapsed() > HANG_LIMIT {
                fail(
                    format!("no answer after {HANG_LIMIT:?}, although room was made all along"),
                    line,
                    b"",
                );
            }
            if relieved.elapsed() > RELIEF_AFTER || self.someone_waits() {
                self.stats.reliefs.fetch_add(1, Ordering::Relaxed);
                self.relieve();
                relieved = Instant::now();
            }
        }
    }

    /// The answer to one line, waited for if pending.
    fn answer(&self, line: &[u8]) -> Vec<u8> {
        match self.start(line, false) {
            Answer::Now(out) => out,
            Answer::Later(handle) => self.wait(handle, line),
        }
    }

    /// The response rules; returns the answer as JSON.
    fn check_response(&self, line: &[u8], answer: &[u8]) -> Value {
        self.check_envelope(line, answer, true)
    }

    /// The response rules, the action's schema only with `schema` (the harness's own
    /// read-outs skip it: they are checked field by field, and fuzz lines of every action
    /// check the schema).
    fn check_envelope(&self, line: &[u8], answer: &[u8], schema: bool) -> Value {
        if answer.last() != Some(&b'\n') || answer.iter().filter(|&&b| b == b'\n').count() != 1 {
            fail("the answer is not exactly one line", line, answer);
        }
        let v: Value = serde_json::from_slice(answer)
            .unwrap_or_else(|e| fail(format!("the answer is not JSON: {e}"), line, answer));
        let Some(o) = v.as_object() else {
            fail("the answer is not an object", line, answer)
        };
        const FIELDS: [&str; 6] = [
            "success",
            "request_id",
            "data",
            "error_code",
            "error_message",
            "status_code",
        ];
        if o.len() != 6 || FIELDS.iter().any(|f| !o.contains_key(*f)) {
            fail(
                "the answer does not have exactly the six envelope fields",
                line,
                answer,
            );
        }
        let Some(success) = o["success"].as_bool() else {
            fail("success is not a bool", line, answer)
        };
        let Some(status) = o["status_code"].as_u64() else {
            fail("status_code is not an integer", line, answer)
        };
        let parsed = parse_request(line);
        let expected_id: Option<String> = match &parsed {
            Ok(r) => Some(r.request_id.to_string()),
            Err(e) => e.request_id.as_ref().map(std::string::ToString::to_string),
        };
        match (&o["request_id"], &expected_id) {
            (Value::Null, None) => {}
            (Value::String(s), Some(id)) if s == id => {}
            _ => fail(
                format!("request_id is not the request's ({expected_id:?})"),
                line,
                answer,
            ),
        }
        if success {
            if status != 200 || !o["error_code"].is_null() || !o["error_message"].is_null() {
                fail(
                    "a success with an error code, a message or a status other than 200",
                    line,
                    answer,
                );
            }
            if !o["data"].is_object() {
                fail("a success whose data is not an object", line, answer);
            }
            let action = match &parsed {
                Ok(r) => r.action.to_string(),
                Err(_) => fail("a success for a line that is not a request", line, answer),
            };
            let Some(validator) = self.responses.get(action.as_str()) else {
                fail("a success for an unknown action", line, answer)
            };
            if !schema {
                return v;
            }
            let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
            if !errors.is_empty() {
                fail(
                    format!("the answer does not match the {action} response schema: {errors:?}"),
                    line,
                    answer,
                );
            }
        } else {
            if !o["data"].is_null() {
                fail("a failure with data", line, answer);
            }
            let Some(code) = o["error_code"].as_str() else {
                fail("a failure without error_code", line, answer)
            };
            let Some(code) = ErrorCode::ALL.iter().find(|c| c.as_str() == code) else {
                fail("an error_code outside the contract", line, answer)
            };
            if u64::from(code.status()) != status {
                fail(
                    format!("status_code is not {}'s", code.status()),
                    line,
                    answer,
                );
            }
            if o["error_message"].as_str().is_none_or(str::is_empty) {
                fail("a failure without a message", line, answer);
            }
            match *code {
                ErrorCode::InternalError => {
                    fail("INTERNAL_ERROR (a panic inside the worker)", line, answer)
                }
                ErrorCode::RequestTooLarge
                | ErrorCode::Unauthorized
                | ErrorCode::MethodNotAllowed
                | ErrorCode::ShuttingDown => fail(
                    "an error code this transport-less service never sends",
                    line,
                    answer,
                ),
                _ => {}
            }
            match &parsed {
                Err(_) if *code != ErrorCode::InvalidRequest => fail(
                    "a line that is not a request must be INVALID_REQUEST",
                    line,
                    answer,
                ),
                Ok(r)
                    if Action::from_name(&r.action).is_none()
                        && *code != ErrorCode::UnknownAction =>
                {
                    fail("an unknown action must be UNKNOWN_ACTION", line, answer)
                }
                Ok(r)
                    if Action::from_name(&r.action).is_some()
                        && matches!(
                            *code,
                            ErrorCode::InvalidRequest | ErrorCode::UnknownAction
                        ) =>
                {
                    fail(
                        "a valid envelope refused as INVALID_REQUEST/UNKNOWN_ACTION",
                        line,
                        answer,
                    )
                }
                _ => {}
            }
        }
        v
    }

    /// Waits until no transfer is running (copies run on threads of their own).
    fn settle_transfers(&self) {
        let started = Instant::now();
        while !self.service.running_transfers().is_empty() {
            assert!(
                started.elapsed() < HANG_LIMIT,
                "a transfer is still running after {HANG_LIMIT:?}: {:?}",
                self.service
                    .running_transfers()
                    .iter()
                    .map(|t| t.transfer_id.clone())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Checks an answer to an input's line and notes the ids in it.
    fn take(&self, line: &[u8], answer: &[u8], ids: &mut Ids) {
        let v = self.check_response(line, answer);
        if v["success"] == json!(true) {
            self.stats.successes.fetch_add(1, Ordering::Relaxed);
        } else if v["error_code"] == "TOO_MANY_REQUESTS" {
            self.stats.refused_in_flight.fetch_add(1, Ordering::Relaxed);
        }
        ids.harvest(&v);
    }

    /// Runs one fuzz input: the state is reset (room made), then each line is handled and
    /// checked, then the invariants are checked.
    pub fn run_input(&self, data: &[u8]) {
        self.settle_transfers();
        self.relieve();
        self.stats.inputs.fetch_add(1, Ordering::Relaxed);
        let mut ids = Ids::default();
        let mut later = Vec::new();
        let mut pauses = 0;
        for raw in data.split(|&b| b == b'\n').take(MAX_LINES) {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw == b"~" {
                if pauses < 4 {
                    pauses += 1;
                    std::thread::sleep(Duration::from_millis(PAUSE_MS));
                }
                continue;
            }
            let (concurrent, raw) = match raw.strip_prefix(b"&") {
                Some(rest) => (true, rest),
                None => (false, raw),
            };
            let line = ids.substitute(raw);
            self.stats.lines.fetch_add(1, Ordering::Relaxed);
            let answer = match self.start(&line, true) {
                Answer::Now(out) => out,
                Answer::Later(handle) if concurrent => {
                    later.push((line, handle));
                    continue;
                }
                Answer::Later(handle) => self.wait(handle, &line),
            };
            self.take(&line, &answer, &mut ids);
        }
        for (line, handle) in later {
            let answer = self.wait(handle, &line);
            self.take(&line, &answer, &mut ids);
        }
        self.settle_transfers();
        for t in ids.transfers.clone() {
            let d = self.call("memory.get_transfer", json!({"transfer_id": t}));
            let status = d["status"].as_str().unwrap_or_default();
            let done = d["bytes_transferred"].as_u64().unwrap_or(u64::MAX);
            let total = d["total_bytes"].as_u64().unwrap_or(0);
            assert!(
                status == "Completed" && done == total || status == "Failed" && done <= total,
                "a transfer that is not running is neither Completed with every byte nor Failed: {d}\n  input: {}",
                show(data)
            );
        }
        self.check_invariants(data);
    }

    /// The service's books agree with themselves. What the budget bounds must hold at any
    /// time; figures that a background thread (a background optimize, the keep-alive sweeper)
    /// may change between two requests are checked again for up to a second before failing.
    pub fn check_invariants(&self, input: &[u8]) {
        let mut last = String::new();
        // The device read-outs (list_devices, get_status) on every fourth input: they cost
        // as much as the rest of the checks together.
        let full = self.stats.inputs.load(Ordering::Relaxed) % 4 == 1;
        for _ in 0..50 {
            match self.books(full) {
                Ok(()) => return,
                Err(why) => last = why,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("invariant broken: {last}\n  input: {}", show(input));
    }

    fn books(&self, full: bool) -> Result<(), String> {
        // Every place in the in-flight bound is given back once answers and background work
        // are done.
        let taken = self.limit.in_flight();
        if taken != 0 {
            return Err(format!(
                "{taken} in-flight place(s) still taken after every answer and transfer"
            ));
        }
        let mut seen = HashSet::new();
        let mut by_owner: HashMap<String, (u64, HashSet<String>)> = HashMap::new();
        let devices = if full {
            self.call("memory.list_devices", Value::Null)
        } else {
            Value::Null
        };
        for d in DEVICES {
            let u = self.call("memory.get_usage", json!({"device_id": d}));
            let n = |k: &str| {
                u[k].as_u64()
                    .unwrap_or_else(|| panic!("{d}: {k} missing: {u}"))
            };
            let (allocated, reservation, budget) = (
                n("allocated_bytes"),
                n("reservation_bytes"),
                n("budget_bytes"),
            );
            // Always.
            assert_eq!(budget, BUDGET, "{d}: budget_bytes {u}");
            assert!(
                allocated + reservation <= budget,
                "{d}: allocated_bytes + reservation_bytes over the budget: {u}"
            );
            assert!(
                n("reserved_bytes") >= allocated,
                "{d}: reserved < allocated: {u}"
            );
            assert!(
                n("peak_allocated_bytes") >= allocated,
                "{d}: peak_allocated: {u}"
            );
            assert!(
                n("peak_reserved_bytes") >= n("reserved_bytes"),
                "{d}: peak_reserved: {u}"
            );
            assert!(
                n("model_bytes") <= allocated + reservation,
                "{d}: model_bytes: {u}"
            );
            assert_eq!(
                n("allocation_count"),
                n("total_allocations") - n("total_deallocations"),
                "{d}: allocation_count is not total_allocations - total_deallocations: {u}"
            );
            let mut available = None;
            if full {
                let info = devices["devices"]
                    .as_array()
                    .and_then(|a| a.iter().find(|i| i["device_id"] == json!(d)))
                    .unwrap_or_else(|| panic!("{d} not listed: {devices}"));
                let status = self.call(
                    "memory.get_status",
                    json!({"device_id": d, "include_allocations": false, "include_fragmentation": true}),
                );
                let f = &status["fragmentation"];
                let free = f["free_bytes"].as_u64().unwrap_or(0);
                assert!(
                    f["largest_free_block_bytes"].as_u64().unwrap_or(u64::MAX) <= free,
                    "{d}: largest free block over free bytes: {status}"
                );
                let pct = f["fragmentation_percentage"].as_f64().unwrap_or(-1.0);
                assert!(
                    (0.0..=100.0).contains(&pct),
                    "{d}: fragmentation_percentage {pct}"
                );
                let score = status["health_score"].as_f64().unwrap_or(-1.0);
                assert!((0.0..=100.0).contains(&score), "{d}: health_score {score}");
                available = info["available_memory"].as_u64();
            }

            // Between two requests, a background thread may have changed them.
            let a = self.call(
                "memory.get_allocations",
                json!({"device_id": d, "limit": 100000}),
            );
            let u2 = self.call("memory.get_usage", json!({"device_id": d}));
            if u2 != u {
                return Err(format!("{d}: usage changed while it was read"));
            }
            let list = a["allocations"].as_array().cloned().unwrap_or_default();
            let total = a["total_count"].as_u64().unwrap_or(u64::MAX);
            if total != list.len() as u64 || total != n("allocation_count") {
                return Err(format!(
                    "{d}: {} listed, total_count {total}, allocation_count {}",
                    list.len(),
                    n("allocation_count")
                ));
            }
            let (mut held, mut reserved, mut models) = (0u64, 0u64, 0u64);
            for x in &list {
                let id = x["allocation_id"].as_str().unwrap_or_default().to_string();
                let size = x["size_bytes"].as_u64().unwrap_or(0);
                if x["device_id"] != json!(d) || size == 0 {
                    return Err(format!("{d}: listed {x}"));
                }
                if !seen.insert(id.clone()) {
                    return Err(format!("allocation {id} listed twice"));
                }
                let owner = x["owner"].as_str().unwrap_or_default();
                if x["allocation_type"] == json!("Reservation") {
                    reserved += size;
                    if !x["handle"].is_null() {
                        return Err(format!("{d}: a Reservation with a handle: {x}"));
                    }
                } else {
                    held += size;
                    let align = x["alignment"].as_u64().unwrap_or(0);
                    if !align.is_power_of_two() || align < 64 {
                        return Err(format!("{d}: alignment {align}: {x}"));
                    }
                    match (d, &x["handle"]) {
                        ("cpu", Value::Null) => {}
                        ("shm", Value::Object(h)) => {
                            let off = h.get("offset").and_then(Value::as_u64).unwrap_or(1);
                            if off % align != 0 || off + size > BUDGET + BUDGET / 4 {
                                return Err(format!("shm: handle {x}"));
                            }
                        }
                        _ => return Err(format!("{d}: handle {x}")),
                    }
                }
                if owner.starts_with("model:") {
                    models += size;
                    let e = by_owner.entry(owner.to_string()).or_default();
                    e.0 += size;
                    e.1.insert(d.to_string());
                } else if owner != "client" {
                    return Err(format!("{d}: owner {owner:?}"));
                }
            }
            if held != allocated || reserved != reservation || models != n("model_bytes") {
                return Err(format!(
                    "{d}: listed sizes (held {held}, reservations {reserved}, models {models}) are not the usage's: {u}"
                ));
            }
            if let Some(available) = available
                && available > budget - allocated - reservation
            {
                return Err(format!(
                    "{d}: available_memory {available} over what the budget leaves: {u}"
                ));
            }
        }
        // Every model's bytes are where it says, and add up to its size.
        let m = self.call("memory.model_status", Value::Null);
        for model in m["models"].as_array().into_iter().flatten() {
            if model["state"] == json!("Loading") {
                continue;
            }
            let owner = format!("model:{}", model["model_name"].as_str().unwrap_or_default());
            let (bytes, on) = by_owner.remove(&owner).unwrap_or_default();
            let resident = model["resident_device_id"].as_str().unwrap_or_default();
            if bytes != model["size_bytes"].as_u64().unwrap_or(u64::MAX)
                || on.iter().any(|d| d != resident)
            {
                return Err(format!("{owner}: {bytes} bytes listed on {on:?}: {model}"));
            }
        }
        if !by_owner.is_empty()
            && !m["models"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["state"] == json!("Loading")))
        {
            return Err(format!(
                "allocations of models that are not loaded: {by_owner:?}"
            ));
        }
        Ok(())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.service.begin_shutdown();
        self.service.close();
        let _ = std::fs::remove_dir_all(&self.model_root);
    }
}

/// The process-wide harness of a fuzz target.
pub fn global() -> &'static Harness {
    static H: std::sync::OnceLock<Harness> = std::sync::OnceLock::new();
    H.get_or_init(Harness::new)
}
