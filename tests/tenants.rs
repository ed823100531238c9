//! Tenants and quotas (the contract's section 8.2): a session names its tenant with
//! `memory.hello`, an HTTP request with its bearer token; quotas hold to the byte on every
//! device (allocations, Reservations and model loads alike) and a refused request changes
//! nothing; a tenant sees and frees only its own allocations, the operator (`admin`) all.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
mod common;
use common::Scratch;

use common::inproc::{InProcessServer, InProcessWorker, settings};
use common::{Requests, map, pattern, write_model};
use memcoord::dispatch::Dispatcher;
use memcoord::domain::{TenantSpec, Tenants};
use memcoord::service::MemoryService;
use memcoord::transport::server::ServeOptions;
use memcoord::transport::stdio::WorkerOptions;
use memcoord::transport::unix::UnixServer;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// `render` (shm 4 MiB, cpu 8 MiB) and `chat` (cpu 1 MiB); the operator's token `t-admin`.
fn tenants() -> Tenants {
    let spec = |token: &str, quota: &[(&str, u64)]| TenantSpec {
        token: Some(token.to_string()),
        quota: quota.iter().map(|(d, b)| (d.to_string(), *b)).collect(),
    };
    Tenants::new(
        BTreeMap::from([
            (
                "render".to_string(),
                spec("t-render", &[("shm", 4 * MIB), ("cpu", 8 * MIB)]),
            ),
            ("chat".to_string(), spec("t-chat", &[("cpu", MIB)])),
        ]),
        Some("t-admin"),
    )
    .unwrap()
}

/// A service with room to spare (256 MiB cpu, 64 MiB shm) and the tenants above, its models
/// under `root`.
fn service(root: &Path) -> MemoryService {
    MemoryService::new(settings("256MiB", "64MiB").devices().unwrap())
        .with_model_root(root)
        .with_tenants(tenants())
}

/// One NDJSON connection to the Unix socket: one session.
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

    /// A session of the tenant whose token `token` is.
    fn hello(path: &Path, token: &str, tenant: &str) -> Client {
        let mut c = Client::connect(path);
        let v = c.request("memory.hello", json!({"token": token}));
        assert_eq!(v["success"], true, "{v}");
        assert_eq!(v["data"]["tenant"], tenant);
        assert_eq!(v["data"]["session_id"].as_str().unwrap().len(), 36);
        c
    }
}

impl Requests for Client {
    fn request(&mut self, action: &str, data: Value) -> Value {
        self.next += 1;
        let id = format!("c-{}", self.next);
        let line = json!({"request_id": id, "action": action, "data": data}).to_string();
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let mut answer = String::new();
        assert!(self.reader.read_line(&mut answer).unwrap() > 0, "closed");
        let v: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["request_id"], json!(id));
        v
    }
}

fn socket(
    service: MemoryService,
    path: &Path,
) -> (Arc<MemoryService>, UnixServer, tokio::runtime::Runtime) {
    let service = Arc::new(service);
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

fn ok(v: Value) -> Value {
    assert_eq!(v["success"], true, "{v}");
    v["data"].clone()
}

fn refused(v: &Value, code: &str) -> String {
    assert_eq!(v["success"], false, "{v}");
    assert_eq!(v["error_code"], code, "{v}");
    v["error_message"].as_str().unwrap().to_string()
}

fn usage(c: &mut impl Requests, device: &str) -> Value {
    ok(c.request("memory.get_usage", json!({"device_id": device})))
}

fn allocate(c: &mut impl Requests, device: &str, size: u64, kind: &str) -> Value {
    c.request(
        "memory.allocate",
        json!({"device_id": device, "size_bytes": size, "allocation_type": kind}),
    )
}

/// What a refused request must leave as it was: every counter of the device but the clock's.
fn books(u: &Value) -> Value {
    json!([
        u["allocated_bytes"],
        u["reservation_bytes"],
        u["model_bytes"],
        u["allocation_count"],
        u["total_allocations"],
        u["failed_allocations"],
        u["tenant_bytes"]
    ])
}

#[test]
fn quotas_hold_to_the_byte_on_every_device_with_models_and_reservations() {
    let dir = Scratch::new("quota");
    let model = write_model(&dir.0.join("m.safetensors"), &[("w", 64 * 1024)]); // 256 KiB
    write_model(&dir.0.join("big.safetensors"), &[("w", 128 * 1024)]); // 512 KiB
    write_model(&dir.0.join("small.safetensors"), &[("w", 1024)]); // 4 KiB
    let path = dir.0.join("mc.sock");
    let (service, _server, _rt) = socket(service(&dir.0), &path);
    let mut render = Client::hello(&path, "t-render", "render");
    let mut chat = Client::hello(&path, "t-chat", "chat");
    let load = |c: &mut Client, name: &str| {
        c.request(
            "memory.model_load",
            json!({"model_name": name, "path": format!("{name}.safetensors"), "device_id": "shm"}),
        )
    };

    // shm: 3 MiB + a 512 KiB Reservation + a 256 KiB model = 3.75 MiB of render's 4 MiB.
    let a = ok(allocate(&mut render, "shm", 3 * MIB, "General"));
    assert_eq!(a["allocation"]["tenant"], "render");
    ok(allocate(&mut render, "shm", 512 * KIB, "Reservation"));
    let m = ok(load(&mut render, "m"));
    assert_eq!(m["size_bytes"], 256 * KIB);
    let used = 3 * MIB + 768 * KIB;
    assert_eq!(usage(&mut render, "shm")["tenant_bytes"]["render"], used);

    // One byte past the quota is refused at once (it does not wait: the device has room),
    // naming tenant, device, quota, use and request; nothing changed.
    let before = books(&usage(&mut render, "shm"));
    let over = allocate(&mut render, "shm", 256 * KIB + 1, "General");
    let message = refused(&over, "QUOTA_EXCEEDED");
    assert_eq!(over["status_code"], 403);
    for part in [
        "`render`",
        "shm",
        "(4194304 bytes)",
        &format!("({used} bytes)"),
        "(262145 bytes)",
    ] {
        assert!(message.contains(part), "{part} in {message}");
    }
    refused(
        &allocate(&mut render, "shm", 256 * KIB + 1, "Reservation"),
        "QUOTA_EXCEEDED",
    );
    // A model load past the quota: refused before anything is loaded or evicted.
    refused(&load(&mut render, "big"), "QUOTA_EXCEEDED");
    refused(
        &render.request("memory.model_status", json!({"model_name": "big"})),
        "MODEL_NOT_FOUND",
    );
    assert_eq!(
        books(&usage(&mut render, "shm")),
        before,
        "refusals changed nothing"
    );

    // Exactly the quota, the last 4 KiB by a model load: accepted; then not one byte more.
    let last = ok(allocate(&mut render, "shm", 252 * KIB, "General"));
    ok(load(&mut render, "small"));
    assert_eq!(usage(&mut render, "shm")["tenant_bytes"]["render"], 4 * MIB);
    let full = books(&usage(&mut render, "shm"));
    refused(
        &allocate(&mut render, "shm", 1, "General"),
        "QUOTA_EXCEEDED",
    );
    refused(
        &allocate(&mut render, "shm", 1, "Reservation"),
        "QUOTA_EXCEEDED",
    );
    assert_eq!(books(&usage(&mut render, "shm")), full);

    // Unloading gives the model's bytes back to the tenant, to the byte.
    ok(render.request("memory.model_unload", json!({"model_name": "small"})));
    ok(allocate(&mut render, "shm", 4 * KIB, "General"));
    refused(
        &allocate(&mut render, "shm", 1, "General"),
        "QUOTA_EXCEEDED",
    );
    // And so does freeing.
    ok(render.request(
        "memory.deallocate",
        json!({"allocation_id": last["allocation"]["allocation_id"]}),
    ));
    ok(allocate(&mut render, "shm", 252 * KIB, "General"));
    refused(
        &allocate(&mut render, "shm", 1, "General"),
        "QUOTA_EXCEEDED",
    );

    // The model's bytes are the file's (read through the engine).
    let status = ok(render.request("memory.model_status", json!({"model_name": "m"})));
    assert_eq!(status["models"][0]["size_bytes"], 256 * KIB);
    let weights = ok(render.request(
        "memory.get_allocations",
        json!({"device_id": "shm", "allocation_type": "ModelWeights"}),
    ));
    assert_eq!(weights["total_count"], 1, "{weights}");
    let id = weights["allocations"][0]["allocation_id"].as_str().unwrap();
    assert_eq!(weights["allocations"][0]["tenant"], "render");
    let mut read = vec![0u8; 256 * KIB as usize];
    service.read(id, 0, &mut read).unwrap();
    assert!(read == model["w"], "the model's bytes are the file's");

    // cpu: 8 MiB, a Reservation included.
    ok(allocate(&mut render, "cpu", 8 * MIB - 1, "Reservation"));
    ok(allocate(&mut render, "cpu", 1, "General"));
    refused(
        &allocate(&mut render, "cpu", 1, "General"),
        "QUOTA_EXCEEDED",
    );

    // Another tenant is unaffected: no quota on shm, its own 1 MiB on cpu.
    ok(allocate(&mut chat, "shm", 16 * MIB, "General"));
    ok(allocate(&mut chat, "cpu", MIB, "General"));
    let m = refused(&allocate(&mut chat, "cpu", 1, "General"), "QUOTA_EXCEEDED");
    assert!(m.contains("chat"), "{m}");
    let cpu = usage(&mut chat, "cpu");
    assert_eq!(cpu["tenant_bytes"], json!({"chat": MIB, "render": 8 * MIB}));
    // A request that waits for room does not wait on a quota.
    let v = chat.request(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 1, "timeout_seconds": 3600}),
    );
    refused(&v, "QUOTA_EXCEEDED");
    drop(service);
}

#[test]
fn a_tenant_cannot_see_free_transfer_or_export_another_tenants_allocation() {
    let dir = Scratch::new("see");
    write_model(&dir.0.join("m.safetensors"), &[("w", 1024)]);
    let path = dir.0.join("mc.sock");
    let (_service, _server, _rt) = socket(service(&dir.0), &path);
    let mut render = Client::hello(&path, "t-render", "render");
    let mut chat = Client::hello(&path, "t-chat", "chat");
    let mut admin = Client::hello(&path, "t-admin", "admin");

    let a = ok(allocate(&mut render, "shm", 64 * KIB, "General"))["allocation"].clone();
    let id = a["allocation_id"].clone();
    let mut mapped = map(a["handle"]["path"].as_str().unwrap());
    let offset = a["handle"]["offset"].as_u64().unwrap() as usize;
    let bytes = pattern(7, 64 * KIB as usize);
    mapped[offset..offset + bytes.len()].copy_from_slice(&bytes);

    // As if it did not exist: the same answer as for an id nobody has.
    let nobody = uuid::Uuid::new_v4().to_string();
    let unknown = refused(
        &chat.request("memory.deallocate", json!({"allocation_id": nobody})),
        "ALLOCATION_NOT_FOUND",
    );
    let m = refused(
        &chat.request("memory.deallocate", json!({"allocation_id": id})),
        "ALLOCATION_NOT_FOUND",
    );
    assert_eq!(m, unknown.replace(&nobody, id.as_str().unwrap()));
    refused(
        &chat.request(
            "memory.transfer",
            json!({"allocation_id": id, "source_device_id": "shm", "destination_device_id": "cpu"}),
        ),
        "ALLOCATION_NOT_FOUND",
    );
    refused(
        &chat.request("memory.export", json!({"allocation_id": id})),
        "ALLOCATION_NOT_FOUND",
    );
    let listed = ok(chat.request("memory.get_allocations", json!({"device_id": "shm"})));
    assert_eq!(listed["total_count"], 0, "{listed}");
    let filtered = ok(chat.request(
        "memory.get_allocations",
        json!({"device_id": "shm", "tenant": "render"}),
    ));
    assert_eq!(filtered["total_count"], 0);
    let status = ok(chat.request("memory.get_status", json!({"device_id": "shm"})));
    assert_eq!(status["allocations"], json!([]));
    // A clear by another tenant frees only that tenant's own.
    let mine = ok(allocate(&mut chat, "shm", 4 * KIB, "General"));
    let cleared = ok(chat.request("memory.clear", json!({"device_id": "shm"})));
    assert_eq!(cleared["cleared_count"], 1);
    assert_eq!(cleared["freed_bytes"], 4 * KIB);
    refused(
        &chat.request(
            "memory.deallocate",
            json!({"allocation_id": mine["allocation"]["allocation_id"]}),
        ),
        "ALLOCATION_NOT_FOUND",
    );
    // Its bytes are as render wrote them.
    assert!(mapped[offset..offset + bytes.len()] == bytes[..]);

    // Its tenant sees it; the operator sees and may free everything.
    let own = ok(render.request("memory.get_allocations", json!({"device_id": "shm"})));
    assert_eq!(own["allocations"][0]["allocation_id"], id);
    let all = ok(admin.request("memory.get_allocations", json!({"device_id": "shm"})));
    assert_eq!(all["total_count"], 1);
    // The operator gets past the tenant check (this in-process service serves no claim
    // socket, which is all its export lacks).
    let x = admin.request(
        "memory.export",
        json!({"allocation_id": id, "claim_seconds": 5}),
    );
    refused(&x, "INVALID_PARAMETER");
    ok(admin.request("memory.deallocate", json!({"allocation_id": id})));
    refused(
        &render.request("memory.deallocate", json!({"allocation_id": id})),
        "ALLOCATION_NOT_FOUND",
    );

    // Models are shared: both acquire the one render loaded; each lease is its taker's alone.
    ok(render.request(
        "memory.model_load",
        json!({"model_name": "m", "path": "m.safetensors", "device_id": "shm"}),
    ));
    let lease = ok(render.request("memory.model_acquire", json!({"model_name": "m"})));
    let theirs = ok(chat.request("memory.model_acquire", json!({"model_name": "m"})));
    let lease_id = lease["lease_id"].as_str().unwrap();
    let m = refused(
        &chat.request("memory.model_release", json!({"lease_id": lease_id})),
        "LEASE_NOT_FOUND",
    );
    assert_eq!(m, format!("Lease {lease_id} not found"));
    refused(
        &chat.request(
            "memory.model_renew",
            json!({"lease_id": lease_id, "ttl_seconds": 60}),
        ),
        "LEASE_NOT_FOUND",
    );
    ok(chat.request(
        "memory.model_release",
        json!({"lease_id": theirs["lease_id"]}),
    ));
    ok(render.request("memory.model_release", json!({"lease_id": lease_id})));

    // A token nobody has changes nothing: the session stays `default`'s.
    let mut other = Client::connect(&path);
    let v = other.request("memory.hello", json!({"token": "wrong"}));
    let m = refused(&v, "UNAUTHORIZED");
    assert!(m.contains("token_file"), "{m}");
    let b = ok(allocate(&mut other, "cpu", 4 * KIB, "General"));
    assert_eq!(b["allocation"]["tenant"], "default");
}

#[test]
fn hello_over_stdio_sets_the_tenant_of_the_session() {
    let dir = Scratch::new("stdio");
    let mut w = InProcessWorker::over(service(&dir.0));
    let before = ok(allocate(&mut w, "cpu", 4 * KIB, "General"));
    assert_eq!(before["allocation"]["tenant"], "default");
    let hello = ok(w.request("memory.hello", json!({"token": "t-render"})));
    assert_eq!(hello["tenant"], "render");
    let a = ok(allocate(&mut w, "cpu", 4 * KIB, "General"));
    assert_eq!(a["allocation"]["tenant"], "render");
    let sessions = ok(w.request("memory.list_sessions", json!({})));
    assert_eq!(sessions["sessions"][0]["tenant"], "render");
    assert_eq!(sessions["sessions"][0]["session_id"], hello["session_id"]);
    // Its quota applies from now on; the earlier allocation stays `default`'s.
    refused(
        &allocate(&mut w, "cpu", 8 * MIB, "General"),
        "QUOTA_EXCEEDED",
    );
    let u = usage(&mut w, "cpu");
    assert_eq!(
        u["tenant_bytes"],
        json!({"default": 4 * KIB, "render": 4 * KIB})
    );
    // A token wrong for the worker: refused, the session stays `render`'s.
    refused(
        &w.request("memory.hello", json!({"token": "nope"})),
        "UNAUTHORIZED",
    );
    let a = ok(allocate(&mut w, "cpu", 4 * KIB, "General"));
    assert_eq!(a["allocation"]["tenant"], "render");

    // Without tenants, any token is `default`'s: nothing to check it against.
    let mut plain = InProcessWorker::start("64MiB", "64MiB");
    let hello = ok(plain.request("memory.hello", json!({"token": "anything"})));
    assert_eq!(hello["tenant"], "default");
}

#[test]
fn the_bearer_token_names_the_tenant_over_http() {
    let dir = Scratch::new("http");
    let root = dir.0.clone();
    let s = InProcessServer::over(
        service(&root),
        ServeOptions {
            token: Some("t-admin".into()),
            ..Default::default()
        },
    );
    let as_ = |token: Option<&str>, method: &str, path: &str, body: Option<Value>| {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        s.request(
            method,
            path,
            &headers,
            body.map(|b| b.to_string()).as_deref(),
        )
    };
    let alloc = |token, size: u64| {
        as_(
            token,
            "POST",
            "/v1/allocations",
            Some(json!({"device_id": "shm", "size_bytes": size})),
        )
    };
    let a = alloc(Some("t-render"), 4 * MIB).json()["data"].clone();
    assert_eq!(a["allocation"]["tenant"], "render", "{a}");
    let over = alloc(Some("t-render"), 1);
    assert_eq!(over.status, 403);
    assert_eq!(over.json()["error_code"], "QUOTA_EXCEEDED");
    // Without a token: the tenant `default` (tenants are declared); a wrong one: refused.
    let d = alloc(None, 4 * KIB).json()["data"].clone();
    assert_eq!(d["allocation"]["tenant"], "default", "{d}");
    assert_eq!(alloc(Some("nope"), 1).status, 401);
    // Each sees its own; the operator all.
    let count = |token| {
        as_(token, "GET", "/v1/devices/shm/allocations", None).json()["data"]["total_count"].clone()
    };
    assert_eq!(count(Some("t-render")), 1);
    assert_eq!(count(Some("t-chat")), 0);
    assert_eq!(count(None), 1);
    assert_eq!(count(Some("t-admin")), 2);
    let id = a["allocation"]["allocation_id"].as_str().unwrap();
    let gone = as_(
        Some("t-chat"),
        "DELETE",
        &format!("/v1/allocations/{id}"),
        None,
    );
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["error_code"], "ALLOCATION_NOT_FOUND");
    let metrics = as_(Some("t-admin"), "GET", "/metrics", None);
    let text = metrics.body;
    assert!(
        text.contains(&format!(
            "memcoord_tenant_allocated_bytes{{tenant=\"render\",device=\"shm\"}} {}",
            4 * MIB
        )),
        "{text}"
    );
    let freed = as_(
        Some("t-admin"),
        "DELETE",
        &format!("/v1/allocations/{id}"),
        None,
    );
    assert_eq!(freed.status, 200);
}

#[test]
fn tenants_are_read_from_the_config_file_and_bad_ones_refused() {
    let dir = Scratch::new("config");
    let token = |name: &str, text: &str| {
        let p = dir.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let a = token("a.token", "  tok-a\n");
    let b = token("b.token", "tok-b");
    let same = token("same.token", "tok-a\n");
    let empty = token("empty.token", " \n");
    let config = |text: String| {
        let p = dir.0.join("memcoord.toml");
        std::fs::write(&p, text).unwrap();
        memcoord::config::Settings::from_file(&p)
    };
    let s = config(format!(
        "[tenants.render]\ntoken_file = {a:?}\nquota = {{ \"cpu\" = \"40MiB\", \"shm\" = 4096 }}\n\
         [tenants.chat]\ntoken_file = {b:?}\n[tenants.default]\nquota = {{ \"cpu\" = \"1KiB\" }}\n"
    ))
    .unwrap();
    assert_eq!(s.tenants["render"].token.as_deref(), Some("tok-a"));
    assert_eq!(s.tenants["render"].quota["cpu"], 40 * MIB);
    assert_eq!(s.tenants["render"].quota["shm"], 4096);
    assert!(s.tenants["chat"].quota.is_empty());
    assert_eq!(s.tenants["default"].quota["cpu"], KIB);
    let t = Tenants::new(s.tenants.clone(), Some("op")).unwrap();
    assert_eq!(t.by_token("tok-b").as_deref(), Some("chat"));
    assert_eq!(t.by_token("op").as_deref(), Some("admin"));
    assert_eq!(t.quota("default", "cpu"), Some(KIB));
    assert_eq!(t.quota("chat", "cpu"), None);

    let err = |text: String| config(text).unwrap_err().to_string();
    let e = err(format!(
        "[tenants.x]\ntoken_file = {:?}\n",
        dir.0.join("missing")
    ));
    assert!(e.contains("cannot read") && e.contains("missing"), "{e}");
    let e = err(format!("[tenants.x]\ntoken_file = {empty:?}\n"));
    assert!(e.contains("empty"), "{e}");
    let e = err(format!(
        "[tenants.x]\ntoken_file = {a:?}\n[tenants.y]\ntoken_file = {same:?}\n"
    ));
    assert!(e.contains("same token"), "{e}");
    let e = err("[tenants.x]\nquota = { \"cpu\" = \"1GiB\" }\n".to_string());
    assert!(e.contains("token_file is missing"), "{e}");
    let e = err(format!("[tenants.admin]\ntoken_file = {a:?}\n"));
    assert!(e.contains("operator"), "{e}");
    let e = err(format!(
        "[tenants.x]\ntoken_file = {a:?}\nquota = {{ \"gpu\" = \"1GiB\" }}\n"
    ));
    assert!(e.contains("gpu"), "{e}");
    // The operator's token may not be a tenant's.
    let t = Tenants::new(s.tenants, Some("tok-a"));
    assert!(t.unwrap_err().contains("same token"));

    // A worker whose config names a token file it cannot read does not start (exit 2).
    let p = dir.0.join("bad.toml");
    std::fs::write(
        &p,
        format!("[tenants.x]\ntoken_file = {:?}\n", dir.0.join("missing")),
    )
    .unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["worker", "--no-gpu", "--config", p.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("token_file"));
}
