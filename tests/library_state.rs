//! A library user of `MemoryService` with a state directory persists as the worker does: the
//! service records its persistent `shm` allocations itself, before each call returns, with no
//! dispatcher or transport in between.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use memcoord::api::{AllocateRequest, DeallocateRequest};
use memcoord::config::Settings;
use memcoord::service::MemoryService;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn service(dir: &Path) -> (MemoryService, usize) {
    let mut settings = Settings {
        no_gpu: true,
        state_dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    settings.set_budget("cpu=64MiB").unwrap();
    settings.set_budget("shm=64MiB").unwrap();
    MemoryService::new(settings.devices().unwrap())
        .with_state_dir(dir)
        .unwrap()
}

fn listed(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("state.json")).unwrap()
}

#[test]
fn a_library_user_with_a_state_dir_persists_every_change_before_the_call_returns() {
    let dir = std::env::temp_dir().join(format!("memcoord-library-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (s, adopted) = service(&dir);
    assert_eq!(adopted, 0);

    let mut req = AllocateRequest::new("shm", MIB);
    req.persistent = true;
    let kept = s.allocate_now(req).unwrap().allocation.allocation_id;
    let mut req = AllocateRequest::new("shm", 2 * MIB);
    req.persistent = true;
    let freed = s.allocate_now(req).unwrap().allocation.allocation_id;
    let other = s
        .allocate_now(AllocateRequest::new("shm", MIB))
        .unwrap()
        .allocation
        .allocation_id;
    // On disk as soon as the calls return: no dispatcher, no shutdown.
    let state = listed(&dir);
    assert!(state.contains(&kept) && state.contains(&freed), "{state}");
    assert!(!state.contains(&other), "only persistent ones: {state}");
    s.write(&kept, 0, b"kept bytes").unwrap();

    s.deallocate(&DeallocateRequest {
        allocation_id: freed.clone(),
        device_id: None,
    })
    .unwrap();
    let state = listed(&dir);
    assert!(state.contains(&kept) && !state.contains(&freed), "{state}");

    // The next service over the directory adopts what the first left.
    s.shut_down();
    drop(s);
    let (s, adopted) = service(&dir);
    assert_eq!(adopted, 1);
    let mut buf = [0u8; 10];
    s.read(&kept, 0, &mut buf).unwrap();
    assert_eq!(&buf, b"kept bytes");
    s.deallocate(&DeallocateRequest {
        allocation_id: kept.clone(),
        device_id: None,
    })
    .unwrap();
    assert!(!listed(&dir).contains(&kept));
    s.shut_down();
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A persistent allocation keeps its tenant across a restart: adopted, it still belongs to
/// (and counts against) the tenant that made it, not to `default`.
#[test]
fn an_adopted_persistent_allocation_keeps_its_tenant() {
    let dir = std::env::temp_dir().join(format!("memcoord-library-tenant-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (s, _) = service(&dir);
    let mut req = AllocateRequest::new("shm", MIB);
    req.persistent = true;
    req.holder = memcoord::domain::Caller::of_tenant("render");
    let id = s.allocate_now(req).unwrap().allocation.allocation_id;
    assert!(
        listed(&dir).contains("\"tenant\": \"render\""),
        "{}",
        listed(&dir)
    );
    s.shut_down();
    drop(s);

    let (s, adopted) = service(&dir);
    assert_eq!(adopted, 1);
    let shm = memcoord::api::DeviceRequest {
        device_id: "shm".into(),
    };
    let usage = s.get_usage(&shm).unwrap();
    assert_eq!(
        usage.tenant_bytes.get("render"),
        Some(&MIB),
        "{:?}",
        usage.tenant_bytes
    );
    assert_eq!(usage.tenant_bytes.get("default"), None);
    let list = memcoord::api::GetAllocationsRequest {
        device_id: "shm".into(),
        allocation_type: None,
        purpose: None,
        owner: None,
        tenant: Some("render".into()),
        client_pid: None,
        offset: 0,
        limit: 10,
    };
    let listed_render = s.get_allocations(&list).unwrap();
    assert_eq!(listed_render.total_count, 1);
    assert_eq!(listed_render.allocations[0].allocation_id, id);
    assert_eq!(listed_render.allocations[0].tenant, "render");
    s.shut_down();
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
