//! `memcoord serve`: every REST route exercised and its answers checked against the OpenAPI
//! document the server publishes; auth rules, body limit, unknown routes and methods, request
//! ids, waiting requests and leases over HTTP. In process (the router on a port-0 listener)
//! except what only the process shows: signals, refusals at start, its log.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::InProcessServer;
use common::{HttpAnswer, Server, write_model};
use memcoord::transport::server::ServeOptions;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Checks an answer against the OpenAPI document: the route and method exist, and a 200
/// answer's envelope matches the route's 200 schema (refs resolved in the document).
fn check_against(doc: &Value, path_template: &str, method: &str, a: &HttpAnswer) {
    let op = &doc["paths"][path_template][method];
    assert!(
        op.is_object(),
        "{method} {path_template} not in the OpenAPI document"
    );
    let responses = &op["responses"];
    let status = if a.status == 200 && responses.get("200").is_some() {
        "200"
    } else {
        "default"
    };
    let schema = responses[status]["content"]["application/json"]["schema"].clone();
    assert!(
        schema.is_object(),
        "{method} {path_template}: no {status} schema"
    );
    let mut root = schema;
    root["components"] = doc["components"].clone();
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .unwrap_or_else(|e| panic!("{method} {path_template}: bad schema: {e}"));
    let body = a.json();
    let errors: Vec<String> = validator
        .iter_errors(&body)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path_template}: answer does not match its schema: {errors:?}\n{body}"
    );
    assert_eq!(body["status_code"], a.status, "HTTP status = status_code");
}

fn ok(a: HttpAnswer) -> Value {
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    assert_eq!(v["success"], true, "{v}");
    v["data"].clone()
}

#[test]
fn every_route_answers_as_its_openapi_document_says() {
    let root = std::env::temp_dir().join(format!("memcoord-http-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    write_model(&root.join("m.safetensors"), &[("w", MIB as usize / 4)]);
    let dir = root.clone();
    let s = InProcessServer::start(
        "64MiB",
        "64MiB",
        |svc| {
            // One tenant declared: requests without a token are `default`'s, as before.
            let render = memcoord::domain::TenantSpec {
                token: Some("t-render".into()),
                quota: Default::default(),
            };
            let tenants = memcoord::domain::Tenants::new(
                std::collections::BTreeMap::from([("render".to_string(), render)]),
                None,
            )
            .unwrap();
            svc.with_model_root(dir).with_tenants(tenants)
        },
        ServeOptions::default(),
    );
    let doc = s.get("/v1/openapi.json").json();
    assert_eq!(doc["openapi"], "3.1.0");

    // Every REST route of the document is served (never UNKNOWN_ACTION).
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 24, "{}", paths.len());

    let mut seen = std::collections::BTreeSet::new();
    let mut call = |method: &str, template: &str, path: &str, body: Option<Value>| -> Value {
        let a = s.request(
            method,
            path,
            &[],
            body.as_ref()
                .map(std::string::ToString::to_string)
                .as_deref(),
        );
        check_against(&doc, template, &method.to_ascii_lowercase(), &a);
        seen.insert((template.to_string(), method.to_ascii_lowercase()));
        ok(a)
    };
    let devices = call("GET", "/v1/devices", "/v1/devices", None);
    assert_eq!(devices["devices"].as_array().unwrap().len(), 2);
    let a = call(
        "POST",
        "/v1/allocations",
        "/v1/allocations",
        Some(
            json!({"device_id": "cpu", "size_bytes": MIB, "allocation_type": "Cache", "purpose": "http"}),
        ),
    );
    let id = a["allocation"]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let st = call(
        "GET",
        "/v1/devices/{device_id}/status",
        "/v1/devices/cpu/status?include_allocations=true&include_fragmentation=true",
        None,
    );
    assert_eq!(
        st["allocations"].as_array().unwrap().len(),
        1,
        "query bools read as bools"
    );
    assert!(st["fragmentation"].is_object());
    let u = call(
        "GET",
        "/v1/devices/{device_id}/usage",
        "/v1/devices/cpu/usage",
        None,
    );
    assert_eq!(u["allocated_bytes"], MIB);
    let l = call(
        "GET",
        "/v1/devices/{device_id}/allocations",
        "/v1/devices/cpu/allocations?purpose=http&limit=5",
        None,
    );
    assert_eq!(l["total_count"], 1);
    let t = call(
        "POST",
        "/v1/transfers",
        "/v1/transfers",
        Some(
            json!({"allocation_id": id, "source_device_id": "cpu", "destination_device_id": "shm", "wait_for_completion": true}),
        ),
    );
    assert_eq!(t["status"], "Completed");
    let tid = t["transfer_id"].as_str().unwrap().to_string();
    call(
        "GET",
        "/v1/transfers/{transfer_id}",
        &format!("/v1/transfers/{tid}"),
        None,
    );
    call(
        "POST",
        "/v1/devices/{device_id}/defragment",
        "/v1/devices/shm/defragment",
        None,
    );
    call(
        "POST",
        "/v1/devices/{device_id}/optimize",
        "/v1/devices/shm/optimize",
        Some(json!({"optimization_type": "ClearCache"})),
    );
    let m = call(
        "POST",
        "/v1/models",
        "/v1/models",
        Some(json!({"model_name": "unet", "path": "m.safetensors", "device_id": "shm"})),
    );
    assert_eq!(m["state"], "Loaded");
    let lease = call(
        "POST",
        "/v1/models/{model_name}/acquire",
        "/v1/models/unet/acquire",
        None,
    );
    let lease_id = lease["lease_id"].as_str().unwrap().to_string();
    // Over HTTP a lease has a time limit by default (300 s); a renew gives a new one.
    assert!(lease["expires_at"].is_string(), "{lease}");
    let renewed = call(
        "POST",
        "/v1/leases/{lease_id}/renew",
        &format!("/v1/leases/{lease_id}/renew"),
        Some(json!({"ttl_seconds": 60})),
    );
    assert_eq!(renewed["lease_id"], lease_id.as_str());
    let ms = call("GET", "/v1/models", "/v1/models?model_name=unet", None);
    assert_eq!(ms["models"].as_array().unwrap().len(), 1);
    call(
        "DELETE",
        "/v1/leases/{lease_id}",
        &format!("/v1/leases/{lease_id}"),
        None,
    );
    call(
        "POST",
        "/v1/models/optimize",
        "/v1/models/optimize",
        Some(json!({"strategy": "UnloadIdle", "idle_seconds": 0})),
    );
    call("GET", "/v1/pressure", "/v1/pressure?device_id=cpu", None);
    let an = call(
        "GET",
        "/v1/analytics",
        "/v1/analytics?device_id=cpu&window_seconds=60",
        None,
    );
    assert_eq!(
        an["devices"][0]["window_seconds"], 60,
        "query numbers read as numbers"
    );
    call("GET", "/v1/recommendations", "/v1/recommendations", None);
    let again = call(
        "POST",
        "/v1/allocations",
        "/v1/allocations",
        Some(json!({"device_id": "cpu", "size_bytes": 4096})),
    );
    let id2 = again["allocation"]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    call(
        "DELETE",
        "/v1/allocations/{allocation_id}",
        &format!("/v1/allocations/{id2}"),
        None,
    );
    call(
        "POST",
        "/v1/models",
        "/v1/models",
        Some(json!({"model_name": "vae", "path": "m.safetensors", "device_id": "cpu"})),
    );
    call("DELETE", "/v1/models/{model_name}", "/v1/models/vae", None);
    // A model named like the static route `/v1/models/optimize` is still unloaded by DELETE.
    call(
        "POST",
        "/v1/models",
        "/v1/models",
        Some(json!({"model_name": "optimize", "path": "m.safetensors", "device_id": "cpu"})),
    );
    let gone = call("DELETE", "/v1/models/optimize", "/v1/models/optimize", None);
    assert_eq!(gone["model_name"], "optimize");
    // Exports (section 8.3): made, listed (no secret), ended.
    let shared = call(
        "POST",
        "/v1/allocations",
        "/v1/allocations",
        Some(json!({"device_id": "shm", "size_bytes": 4096})),
    );
    let x = call(
        "POST",
        "/v1/exports",
        "/v1/exports",
        Some(json!({"allocation_id": shared["allocation"]["allocation_id"], "claim_seconds": 5})),
    );
    let listed = call("GET", "/v1/exports", "/v1/exports", None);
    assert_eq!(listed["exports"][0]["export_id"], x["export_id"]);
    // HTTP has no sessions: none are listed, and its allocations name no process.
    let sessions = call("GET", "/v1/sessions", "/v1/sessions", None);
    assert_eq!(sessions["sessions"], json!([]));
    assert_eq!(shared["allocation"]["client_pid"], Value::Null);
    assert_eq!(shared["allocation"]["tenant"], "default");
    // Over HTTP, memory.hello only says whose a token is (each request carries its own).
    let hello = call(
        "POST",
        "/v1/hello",
        "/v1/hello",
        Some(json!({"token": "t-render"})),
    );
    assert_eq!(hello, json!({"session_id": null, "tenant": "render"}));
    let export_id = x["export_id"].as_str().unwrap().to_string();
    let ended = call(
        "DELETE",
        "/v1/exports/{export_id}",
        &format!("/v1/exports/{export_id}"),
        None,
    );
    assert_eq!(ended["allocation_count"], 1);
    call(
        "POST",
        "/v1/devices/{device_id}/clear",
        "/v1/devices/shm/clear",
        Some(json!({"force": true})),
    );
    let state = call(
        "GET",
        "/v1/dashboard/state",
        "/v1/dashboard/state?buckets=64",
        None,
    );
    assert_eq!(
        state["devices"][0]["map"]["buckets"]
            .as_array()
            .unwrap()
            .len(),
        64
    );
    let cmd = s.post(
        "/v1/command",
        &json!({"request_id": "c1", "action": "memory.get_usage", "data": {"device_id": "shm"}}),
    );
    check_against(&doc, "/v1/command", "post", &cmd);
    assert_eq!(ok(cmd)["device_id"], "shm");

    // Every REST operation of the document was exercised.
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            if path.starts_with("/v1/") && path != "/v1/openapi.json" && path != "/v1/command" {
                assert!(
                    seen.contains(&(path.clone(), method.clone())),
                    "{method} {path} not exercised"
                );
            }
        }
    }

    // An error answer matches the error envelope, with HTTP status = status_code.
    let a = s.get("/v1/devices/nope/usage");
    assert_eq!(a.status, 404);
    check_against(&doc, "/v1/devices/{device_id}/usage", "get", &a);
    assert_eq!(a.json()["error_code"], "INVALID_DEVICE");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn unknown_routes_wrong_methods_request_ids_and_the_body_limit() {
    let s = InProcessServer::start(
        "64MiB",
        "64MiB",
        |svc| svc,
        ServeOptions {
            body_limit: 1024,
            ..Default::default()
        },
    );
    let a = s.get("/v1/nothing/here");
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["error_code"], "UNKNOWN_ACTION");
    let a = s.request("PUT", "/v1/allocations", &[], None);
    assert_eq!(a.status, 405);
    assert_eq!(a.json()["error_code"], "METHOD_NOT_ALLOWED");
    let a = s.request("DELETE", "/v1/devices", &[], None);
    assert_eq!(
        (a.status, a.json()["error_code"].clone()),
        (405, json!("METHOD_NOT_ALLOWED"))
    );

    // X-Request-Id is the request_id, echoed; without one the server makes one.
    let a = s.request("GET", "/v1/pressure", &[("X-Request-Id", "my-id-1")], None);
    assert_eq!(a.json()["request_id"], "my-id-1");
    assert_eq!(a.header("x-request-id"), Some("my-id-1"));
    let made = s.get("/v1/pressure").json()["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(made.len(), 36, "a UUID: {made}");

    // Bodies over the limit: REQUEST_TOO_LARGE, nothing done.
    let big = json!({"device_id": "cpu", "size_bytes": 4096, "purpose": "x".repeat(2000)});
    let a = s.post("/v1/allocations", &big);
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["error_code"], "REQUEST_TOO_LARGE");
    let a = s.post(
        "/v1/command",
        &json!({"request_id": "r", "action": "memory.allocate", "data": big}),
    );
    assert_eq!(a.status, 413);
    assert_eq!(ok(s.get("/v1/devices/cpu/usage"))["allocation_count"], 0);

    // Not JSON, not an object.
    let a = s.request("POST", "/v1/allocations", &[], Some("{nope"));
    assert_eq!(
        (a.status, a.json()["error_code"].clone()),
        (400, json!("INVALID_REQUEST"))
    );
    let a = s.request("POST", "/v1/allocations", &[], Some("[1]"));
    assert_eq!(a.json()["error_code"], "INVALID_REQUEST");
    // A query value of the wrong type names the field.
    let a = s.get("/v1/devices/cpu/allocations?limit=many");
    assert_eq!(a.json()["error_code"], "INVALID_PARAMETER");
    assert!(
        a.json()["error_message"]
            .as_str()
            .unwrap()
            .contains("limit")
    );
}

#[test]
fn a_token_guards_every_route_but_healthz() {
    let dir = std::env::temp_dir().join(format!("memcoord-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "s3cret-token\n").unwrap();
    let s = InProcessServer::start(
        "64MiB",
        "64MiB",
        |svc| svc,
        ServeOptions {
            token: Some(std::fs::read_to_string(&file).unwrap().trim().to_string()),
            ..Default::default()
        },
    );
    assert_eq!(s.get("/healthz").status, 200);
    for (path, headers) in [
        ("/v1/devices", vec![]),
        (
            "/v1/devices",
            vec![("Authorization", "Bearer wrong-token!")],
        ),
        ("/v1/devices", vec![("Authorization", "s3cret-token")]),
        ("/metrics", vec![]),
        ("/", vec![]),
        ("/v1/openapi.json", vec![]),
    ] {
        let a = s.request("GET", path, &headers, None);
        assert_eq!(a.status, 401, "{path} {headers:?}");
        assert_eq!(a.json()["error_code"], "UNAUTHORIZED");
    }
    let a = s.request(
        "GET",
        "/v1/devices",
        &[("Authorization", "Bearer s3cret-token")],
        None,
    );
    assert_eq!(a.status, 200);
    // The dashboard page takes the token in its URL too (a browser opening it sends no
    // header); nowhere else does.
    assert_eq!(s.get("/?token=s3cret-token").status, 200);
    assert_eq!(s.get("/?token=wrong").status, 401);
    assert_eq!(s.get("/v1/devices?token=s3cret-token").status, 401);
    let a = s.request(
        "POST",
        "/v1/command",
        &[("Authorization", "Bearer s3cret-token")],
        Some(&json!({"request_id": "x", "action": "memory.list_devices"}).to_string()),
    );
    assert_eq!(a.status, 200);

    // Off loopback without a token: refused at start.
    let out = std::process::Command::new(common::BIN)
        .args([
            "serve",
            "--no-gpu",
            "--budget",
            "cpu=64MiB",
            "--budget",
            "shm=64MiB",
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn waiting_allocations_and_shutdown_over_http() {
    let mut s = Server::spawn(&["--no-gpu", "--budget", "cpu=8MiB", "--budget", "shm=64MiB"]);
    let first = ok(s.post(
        "/v1/allocations",
        &json!({"device_id": "cpu", "size_bytes": 6 * MIB}),
    ));
    let id = first["allocation"]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let port = s.port;
    // Waits for room on its own connection.
    let waiter = std::thread::spawn(move || {
        let s2 = Server::client(port);
        let started = Instant::now();
        let a = s2.post(
            "/v1/allocations",
            &json!({"device_id": "cpu", "size_bytes": 4 * MIB, "timeout_seconds": 20}),
        );
        (a.status, a.body, started.elapsed())
    });
    // Until the allocate waits for room (no fixed sleep: as soon as the server says so).
    until_waiting(&s, 1);
    ok(s.request("DELETE", &format!("/v1/allocations/{id}"), &[], None));
    let (status, body, waited) = waiter.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(waited > Duration::ZERO);

    // SIGTERM: waiters get SHUTTING_DOWN, the server exits 0.
    let waiter = std::thread::spawn(move || {
        Server::client(port).post(
            "/v1/allocations",
            &json!({"device_id": "cpu", "size_bytes": 6 * MIB, "timeout_seconds": 30}),
        )
    });
    until_waiting(&s, 1);
    s.signal(15);
    let a = waiter.join().unwrap();
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.json()["error_code"], "SHUTTING_DOWN");
    assert!(s.wait_exit(Duration::from_secs(20)).success());
}

/// Polls `/v1/pressure` until `n` requests wait for memory on `cpu` (10 s at most).
fn until_waiting(s: &Server, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = ok(s.get("/v1/pressure?device_id=cpu"));
        if p["devices"][0]["waiting_requests"] == n {
            return;
        }
        assert!(Instant::now() < deadline, "never {n} waiting: {p}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends a request on a fresh connection and closes it without reading the answer.
fn send_and_hang_up(port: u16, path: &str, body: &Value) {
    send_and_hang_up_after(port, path, body, Duration::from_millis(300));
}

fn send_and_hang_up_after(port: u16, path: &str, body: &Value, after: Duration) {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let b = body.to_string();
    write!(
        c,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    std::thread::sleep(after);
    drop(c);
}

/// A client that hangs up while its transfer (`wait_for_completion`) copies: the transfer
/// completes for nobody, and every byte arrives.
#[test]
fn a_transfer_whose_client_hangs_up_completes_with_every_byte() {
    let s = InProcessServer::start("1GiB", "1GiB", |svc| svc, ServeOptions::default());
    let size = 256 * MIB as usize;
    let a = ok(s.post(
        "/v1/allocations",
        &json!({"device_id": "shm", "size_bytes": size, "persistent": true}),
    ));
    let id = a["allocation"]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = common::pattern(77, size);
    {
        let h = &a["allocation"]["handle"];
        let mut m = common::map(h["path"].as_str().unwrap());
        let off = h["offset"].as_u64().unwrap() as usize;
        m[off..off + size].copy_from_slice(&bytes);
    }
    send_and_hang_up_after(
        s.port,
        "/v1/transfers",
        &json!({"allocation_id": id, "source_device_id": "shm", "destination_device_id": "cpu",
                "mode": "move", "wait_for_completion": true}),
        Duration::from_millis(5),
    );
    // Done for nobody: the allocation is on cpu, once, and nothing is left on shm.
    let deadline = Instant::now() + Duration::from_secs(30);
    let moved = loop {
        let c = ok(s.get("/v1/devices/cpu/allocations"));
        let h = ok(s.get("/v1/devices/shm/allocations"));
        if c["total_count"] == 1 && h["total_count"] == 0 {
            break c["allocations"][0].clone();
        }
        assert!(Instant::now() < deadline, "not settled: cpu {c}\nshm {h}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(moved["size_bytes"], size);
    assert_eq!(moved["persistent"], true, "a move keeps persistence");
    // Back to shm, by a client that stays, to read every byte through the handle.
    let t = ok(s.post(
        "/v1/transfers",
        &json!({"allocation_id": moved["allocation_id"], "source_device_id": "cpu",
                "destination_device_id": "shm", "wait_for_completion": true}),
    ));
    assert_eq!(t["status"], "Completed", "{t}");
    let back = ok(s.get("/v1/devices/shm/allocations"));
    let h = &back["allocations"][0]["handle"];
    let m = common::map(h["path"].as_str().unwrap());
    let off = h["offset"].as_u64().unwrap() as usize;
    assert!(
        m[off..off + size] == bytes[..],
        "bytes differ after the move"
    );
}

#[test]
fn a_client_that_hangs_up_leaves_nothing_behind() {
    let root = std::env::temp_dir().join(format!("memcoord-hangup-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    write_model(&root.join("m.safetensors"), &[("w", MIB as usize)]);
    let dir = root.clone();
    let s = InProcessServer::start(
        "8MiB",
        "8MiB",
        |svc| svc.with_model_root(dir),
        ServeOptions::default(),
    );
    // Both devices full: the allocate and the load wait for room.
    let cpu = ok(s.post(
        "/v1/allocations",
        &json!({"device_id": "cpu", "size_bytes": 7 * MIB}),
    ));
    let shm = ok(s.post(
        "/v1/allocations",
        &json!({"device_id": "shm", "size_bytes": 7 * MIB}),
    ));
    send_and_hang_up(
        s.port,
        "/v1/allocations",
        &json!({"device_id": "cpu", "size_bytes": 4 * MIB, "timeout_seconds": 20}),
    );
    send_and_hang_up(
        s.port,
        "/v1/models",
        &json!({"model_name": "unet", "path": "m.safetensors", "device_id": "shm", "timeout_seconds": 20}),
    );
    // Room comes; the two requests complete for nobody, and are undone.
    for a in [&cpu, &shm] {
        let id = a["allocation"]["allocation_id"].as_str().unwrap();
        ok(s.request("DELETE", &format!("/v1/allocations/{id}"), &[], None));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let c = ok(s.get("/v1/devices/cpu/usage"));
        let m = ok(s.get("/v1/models"));
        let u = ok(s.get("/v1/devices/shm/usage"));
        if c["allocation_count"] == 0
            && m["models"].as_array().unwrap().is_empty()
            && u["allocation_count"] == 0
            && c["total_allocations"] == 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: cpu {c}\nshm {u}\nmodels {m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// No secret in the logs: with everything logged (`MEMCOORD_LOG=trace`), neither the token nor
/// a wrong one a client sent appears on stderr.
#[test]
fn tokens_never_reach_the_logs() {
    let dir = std::env::temp_dir().join(format!("memcoord-http-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = "s3cret-token-7f1c2d9e";
    let wrong = "wrong-token-a9b8c7d6";
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{secret}\n")).unwrap();
    let log = dir.join("stderr.log");
    let mut server = Server::spawn_with(
        &[
            "--no-gpu",
            "--budget",
            "cpu=64MiB",
            "--budget",
            "shm=64MiB",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[("MEMCOORD_LOG", "trace")],
        || std::fs::File::create(&log).unwrap().into(),
    );
    let good = format!("Bearer {secret}");
    let bad = format!("Bearer {wrong}");
    let body =
        json!({"request_id": "r", "action": "memory.get_usage", "data": {"device_id": "cpu"}})
            .to_string();
    let a = server.request(
        "POST",
        "/v1/command",
        &[("Authorization", &good)],
        Some(&body),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let a = server.request(
        "POST",
        "/v1/command",
        &[("Authorization", &bad)],
        Some(&body),
    );
    assert_eq!(a.status, 401);
    let a = server.request("GET", &format!("/?token={secret}"), &[], None);
    assert_eq!(a.status, 200);
    let a = server.request("GET", &format!("/?token={wrong}"), &[], None);
    assert_eq!(a.status, 401);
    server.signal(15);
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.is_empty(),
        "trace logging wrote nothing: the check would be empty"
    );
    assert!(!text.contains(secret), "the token is in the logs:\n{text}");
    assert!(
        !text.contains(wrong),
        "a client's token is in the logs:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
