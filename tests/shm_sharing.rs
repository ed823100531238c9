//! Another process sees the bytes of an `shm` allocation through its handle, in both
//! directions, using the library's in-process byte API on this side.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use memcoord::api::AllocateRequest;
use memcoord::config::Settings;
use memcoord::service::MemoryService;
use std::process::Command;

fn service() -> MemoryService {
    let mut s = Settings::default();
    s.set_budget("cpu=16MiB").unwrap();
    s.set_budget("shm=16MiB").unwrap();
    MemoryService::new(s.host_devices().unwrap())
}

fn allocate(svc: &MemoryService, size: u64) -> (String, String, u64) {
    let resp = svc.allocate_now(AllocateRequest::new("shm", size)).unwrap();
    let h = resp
        .allocation
        .handle
        .expect("shm allocations have a handle");
    (resp.allocation.allocation_id, h.path, h.offset)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn another_process_reads_and_writes_through_the_handle() {
    let svc = service();
    let _pad = allocate(&svc, 1000);
    let len = 3 * 4096 + 123;
    let (id, path, offset) = allocate(&svc, len as u64);
    assert!(offset > 0);
    let data = pattern(len, 7);
    svc.write(&id, 0, &data).unwrap();

    // Another process reads the bytes at the handle's offset.
    let out = Command::new("dd")
        .arg(format!("if={path}"))
        .args(["iflag=skip_bytes,count_bytes", "status=none"])
        .arg(format!("skip={offset}"))
        .arg(format!("count={len}"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, data, "the other process sees every byte");

    // And writes new ones that this process sees.
    let new = pattern(len, 99);
    let src = std::env::temp_dir().join(format!("memcoord-shm-test-{}", std::process::id()));
    std::fs::write(&src, &new).unwrap();
    let st = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={path}"))
        .args(["oflag=seek_bytes", "conv=notrunc", "status=none"])
        .arg(format!("seek={offset}"))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(&src).unwrap();
    let mut back = vec![0; len];
    svc.read(&id, 0, &mut back).unwrap();
    assert_eq!(back, new);

    svc.close();
    assert!(!std::path::Path::new(&path).exists(), "the file is removed");
}
