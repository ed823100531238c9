//! Leases with a time limit (contract section 8.5): `ttl_seconds` on `memory.model_acquire`,
//! `expires_at`, `memory.model_renew`, expiry (released as a release would, exports included,
//! counted in /metrics), and HTTP's default of 300 s. In process, on a clock the test moves:
//! nothing here sleeps.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;
use common::Scratch;

use common::inproc::{InProcessServer, InProcessWorker};
use common::{
    Allocate, ErrorCode, ModelAcquire, ModelLoad, ModelRelease, ModelStatus, ModelUnload, Requests,
    typed, write_model,
};
use memcoord::api::actions::{export::Export, list_exports::ListExports, model_renew::ModelRenew};
use memcoord::managers::clock::ManualClock;
use memcoord::protocol::Timestamp;
use memcoord::transport::server::ServeOptions;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const MIB: u64 = 1 << 20;

/// A folder with one 4 MiB model (1 Mi f32 values), `m.safetensors`, removed at the end.
fn model_root(tag: &str) -> Scratch {
    let dir = Scratch::new(tag);
    write_model(&dir.0.join("m.safetensors"), &[("w", 1_048_576)]);
    dir
}

/// A worker over cpu and shm of 12 MiB each on a manual clock, with model `m` loaded on `device`.
fn worker(root: &Scratch, device: &str) -> (InProcessWorker, Arc<ManualClock>) {
    let dir = root.0.clone();
    let (mut w, clock) =
        InProcessWorker::on_manual_clock("12MiB", "12MiB", |s| s.with_model_root(dir));
    w.send::<ModelLoad>(json!({"model_name": "m", "path": "m.safetensors", "device_id": device}))
        .unwrap();
    (w, clock)
}

fn at(t: &Timestamp) -> SystemTime {
    t.0
}

/// `later - earlier` is `expected`, to the millisecond the wire writes times in.
fn span(earlier: SystemTime, later: &Timestamp, expected: Duration) {
    let d = at(later).duration_since(earlier).unwrap();
    let off = d.abs_diff(expected);
    assert!(
        off < Duration::from_millis(1),
        "{d:?}, expected {expected:?}"
    );
}

fn expired_counter(service: &memcoord::service::MemoryService) -> u64 {
    let text = memcoord::metrics::render(service.telemetry());
    let line = text
        .lines()
        .find(|l| l.starts_with("memcoord_leases_expired_total "))
        .unwrap_or_else(|| panic!("no memcoord_leases_expired_total in /metrics:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_lease_of_one_second_expires_renew_extends_it_and_the_model_can_be_evicted_again() {
    let root = model_root("expiry");
    let (mut w, clock) = worker(&root, "cpu");
    let acquired_at = w.service.now();
    let lease = w
        .send::<ModelAcquire>(json!({"model_name": "m", "ttl_seconds": 1}))
        .unwrap();
    let expires = lease
        .expires_at
        .expect("a lease with ttl_seconds has expires_at");
    span(acquired_at, &expires, Duration::from_secs(1));
    // model_status lists the lease with its expiry.
    let status = w.send::<ModelStatus>(json!({"model_name": "m"})).unwrap();
    let listed = &status.models[0].leases;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].lease_id, lease.lease_id);
    assert_eq!(listed[0].expires_at, Some(expires));
    // A leased model is not unloaded (nor evicted).
    let refused = w
        .send::<ModelUnload>(json!({"model_name": "m"}))
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::ModelInUse);

    // Just before the deadline nothing expires; a renew then gives it a second from now.
    clock.advance(Duration::from_millis(900));
    assert!(w.service.sweep_expired_leases().is_empty());
    let renewed = w
        .send::<ModelRenew>(json!({"lease_id": lease.lease_id, "ttl_seconds": 1}))
        .unwrap();
    assert_eq!(renewed.lease_id, lease.lease_id);
    // Renewed: a second from the renew.
    span(
        at(&expires),
        &renewed.expires_at,
        Duration::from_millis(900),
    );
    clock.advance(Duration::from_millis(900));
    assert!(
        w.service.sweep_expired_leases().is_empty(),
        "the renew extended it past its first deadline"
    );
    // A renew without ttl_seconds gives it the limit it was last given, again.
    let again = w
        .send::<ModelRenew>(json!({"lease_id": lease.lease_id}))
        .unwrap();
    span(
        at(&renewed.expires_at),
        &again.expires_at,
        Duration::from_millis(900),
    );

    // Past its deadline it is released by the sweep (what the sweeper thread does each
    // second: within 2 s of the deadline whatever the phase of its tick).
    clock.advance(Duration::from_millis(1000));
    assert_eq!(
        w.service.sweep_expired_leases(),
        vec![(lease.lease_id.parse().unwrap(), "m".to_string())]
    );
    assert!(w.service.sweep_expired_leases().is_empty(), "released once");
    assert_eq!(expired_counter(&w.service), 1);
    let status = w.send::<ModelStatus>(json!({"model_name": "m"})).unwrap();
    assert!(status.models[0].leases.is_empty());

    // Gone: renew and release answer LEASE_NOT_FOUND.
    for e in [
        w.send::<ModelRenew>(json!({"lease_id": lease.lease_id, "ttl_seconds": 5}))
            .unwrap_err(),
        w.send::<ModelRelease>(json!({"lease_id": lease.lease_id}))
            .unwrap_err(),
    ] {
        assert_eq!(e.code, ErrorCode::LeaseNotFound, "{e}");
    }

    // The model can be evicted again: an allocation that needs its room takes it.
    let big = w
        .send::<Allocate>(json!({"device_id": "cpu", "size_bytes": 10 * MIB, "timeout_seconds": 0}))
        .unwrap();
    assert_eq!(big.allocation.size_bytes, 10 * MIB);
    assert!(w.send::<ModelStatus>(json!({"model_name": "m"})).is_err());
}

#[test]
fn a_lease_past_its_deadline_is_gone_before_the_sweeper_comes_by() {
    let root = model_root("due");
    let (mut w, clock) = worker(&root, "cpu");
    let a = w
        .send::<ModelAcquire>(json!({"model_name": "m", "ttl_seconds": 2}))
        .unwrap();
    let b = w
        .send::<ModelAcquire>(json!({"model_name": "m", "ttl_seconds": 2}))
        .unwrap();
    clock.advance(Duration::from_secs(2));
    // No sweep yet: the renew itself finds the lease expired, releases it (and every other
    // lease due) and answers LEASE_NOT_FOUND.
    let e = w
        .send::<ModelRenew>(json!({"lease_id": a.lease_id, "ttl_seconds": 10}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::LeaseNotFound);
    let e = w
        .send::<ModelRelease>(json!({"lease_id": b.lease_id}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::LeaseNotFound);
    assert_eq!(expired_counter(&w.service), 2);
    w.send::<ModelUnload>(json!({"model_name": "m"})).unwrap();
}

#[test]
fn leases_without_a_limit_last_until_released_and_renew_can_give_them_one() {
    let root = model_root("nolimit");
    let (mut w, clock) = worker(&root, "cpu");
    // Over stdio no ttl_seconds (or null) means no time limit.
    for data in [
        json!({"model_name": "m"}),
        json!({"model_name": "m", "ttl_seconds": null}),
    ] {
        let lease = w.send::<ModelAcquire>(data).unwrap();
        assert!(lease.expires_at.is_none());
        assert!(lease.model.leases.iter().all(|l| l.expires_at.is_none()));
        clock.advance(Duration::from_secs(40 * 24 * 3600));
        assert!(w.service.sweep_expired_leases().is_empty());
        // Renewing one needs a ttl_seconds: it has no limit to renew.
        let e = w
            .send::<ModelRenew>(json!({"lease_id": lease.lease_id}))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParameter);
        assert!(e.message.contains("ttl_seconds"), "{e}");
        let given = w
            .send::<ModelRenew>(json!({"lease_id": lease.lease_id, "ttl_seconds": 0.5}))
            .unwrap();
        span(
            w.service.now(),
            &given.expires_at,
            Duration::from_millis(500),
        );
        clock.advance(Duration::from_millis(500));
        assert_eq!(w.service.sweep_expired_leases().len(), 1);
    }
    assert_eq!(expired_counter(&w.service), 2);
}

#[test]
fn unknown_leases_and_bad_ttl_seconds_are_refused() {
    let root = model_root("refused");
    let (mut w, _clock) = worker(&root, "cpu");
    for id in [uuid::Uuid::new_v4().to_string(), "not-a-uuid".to_string()] {
        let e = w
            .send::<ModelRenew>(json!({"lease_id": id, "ttl_seconds": 5}))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::LeaseNotFound, "{e}");
        assert!(e.message.contains(&id), "{e}");
    }
    let e = w.send::<ModelRenew>(json!({"ttl_seconds": 5})).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidParameter);
    let lease = w.send::<ModelAcquire>(json!({"model_name": "m"})).unwrap();
    for bad in [
        json!(0),
        json!(-1),
        json!(2_592_001),
        json!(1e300),
        json!("60"),
        json!(true),
    ] {
        let (code, message) = w.err(
            "memory.model_acquire",
            json!({"model_name": "m", "ttl_seconds": bad}),
        );
        assert_eq!(code, "INVALID_PARAMETER", "{bad}");
        assert!(message.contains("ttl_seconds"), "{bad}: {message}");
        let (code, message) = w.err(
            "memory.model_renew",
            json!({"lease_id": lease.lease_id, "ttl_seconds": bad}),
        );
        assert_eq!(code, "INVALID_PARAMETER", "{bad}");
        assert!(message.contains("ttl_seconds"), "{bad}: {message}");
    }
    // A refused request changed nothing: one lease, no limit.
    let status = w.send::<ModelStatus>(json!({"model_name": "m"})).unwrap();
    assert_eq!(status.models[0].leases.len(), 1);
    assert!(status.models[0].leases[0].expires_at.is_none());
    // The most allowed: 30 days.
    let long = w
        .send::<ModelAcquire>(json!({"model_name": "m", "ttl_seconds": 2_592_000}))
        .unwrap();
    assert!(long.expires_at.is_some());
}

#[test]
fn an_expired_lease_ends_the_exports_made_under_it() {
    let root = model_root("exports");
    let (mut w, clock) = worker(&root, "shm");
    let lease = w
        .send::<ModelAcquire>(json!({"model_name": "m", "ttl_seconds": 3}))
        .unwrap();
    w.send::<Export>(json!({"model_name": "m", "lease_id": lease.lease_id}))
        .unwrap();
    assert_eq!(w.send::<ListExports>(json!({})).unwrap().exports.len(), 1);
    clock.advance(Duration::from_secs(3));
    assert_eq!(w.service.sweep_expired_leases().len(), 1);
    assert!(w.send::<ListExports>(json!({})).unwrap().exports.is_empty());
}

#[test]
fn the_sweeper_thread_releases_an_expired_lease_and_a_waiting_load_gets_the_room() {
    let root = model_root("sweeper");
    write_model(&root.0.join("n.safetensors"), &[("w", 1_048_576)]);
    let (mut w, clock) = worker(&root, "cpu");
    w.send::<ModelAcquire>(json!({"model_name": "m", "ttl_seconds": 1}))
        .unwrap();
    // 6 MiB of clients' and the leased 4 MiB model leave 2 MiB: a second 4 MiB model waits.
    w.allocate("cpu", 6 * MIB);
    let waiting = w.submit(
        "memory.model_load",
        json!({"model_name": "n", "path": "n.safetensors", "device_id": "cpu", "timeout_seconds": 60}),
    );
    assert!(
        !w.answered_within(&waiting, Duration::from_millis(200)),
        "the load waits"
    );
    clock.advance(Duration::from_millis(1000));
    // The service's own sweeper (started as `memcoord worker` starts it) releases the lease;
    // the waiting load then evicts the model and is answered.
    w.service.start_keep_alive_sweeper();
    let got = typed::<ModelLoad>(w.wait_for(&waiting, Duration::from_secs(30))).unwrap();
    assert_eq!(got.model_name, "n");
    assert!(
        w.send::<ModelStatus>(json!({"model_name": "m"})).is_err(),
        "m was evicted"
    );
    assert_eq!(expired_counter(&w.service), 1);
}

#[test]
fn over_http_a_lease_lasts_300_seconds_unless_ttl_seconds_says_otherwise() {
    let root = model_root("http");
    let clock = Arc::new(ManualClock::new(1_000_000));
    let service = memcoord::service::MemoryService::with_clock(
        common::inproc::settings("12MiB", "12MiB")
            .devices()
            .unwrap(),
        clock.clone(),
    )
    .with_model_root(root.0.clone());
    let server = InProcessServer::over(service, ServeOptions::default());
    let load = server.post(
        "/v1/models",
        &json!({"model_name": "m", "path": "m.safetensors", "device_id": "cpu"}),
    );
    assert_eq!(load.status, 200, "{}", load.body);
    let now = server.service.now();
    let expiry = |v: &serde_json::Value, expected: u64| {
        let data = typed::<ModelAcquire>(v.clone()).unwrap();
        let at = data.expires_at.expect("over HTTP every lease has a limit");
        span(now, &at, Duration::from_secs(expected));
    };
    // REST, with no body, and the envelope route, with null: 300 s.
    let rest = server.post("/v1/models/m/acquire", &json!({}));
    expiry(&rest.json(), 300);
    let command = server.post(
        "/v1/command",
        &json!({"request_id": "a", "action": "memory.model_acquire",
                "data": {"model_name": "m", "ttl_seconds": null}}),
    );
    expiry(&command.json(), 300);
    // Given, it is the request's.
    let given = server.post("/v1/models/m/acquire", &json!({"ttl_seconds": 20}));
    expiry(&given.json(), 20);
    // Renewed over its REST route.
    let lease_id = typed::<ModelAcquire>(given.json()).unwrap().lease_id;
    let renewed = server.post(
        &format!("/v1/leases/{lease_id}/renew"),
        &json!({"ttl_seconds": 60}),
    );
    let renewed = typed::<ModelRenew>(renewed.json()).unwrap();
    span(now, &renewed.expires_at, Duration::from_secs(60));
    let unknown = server.post(
        &format!("/v1/leases/{}/renew", uuid::Uuid::new_v4()),
        &json!({}),
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error_code"], "LEASE_NOT_FOUND");
    // Five minutes on, the default leases are gone; the 60 s one went before them.
    clock.advance(Duration::from_secs(300));
    assert_eq!(server.service.sweep_expired_leases().len(), 3);
    let metrics = server.get("/metrics");
    assert!(
        metrics.body.contains("memcoord_leases_expired_total 3"),
        "{}",
        metrics.body
    );
}
