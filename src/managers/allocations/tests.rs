//! Unit tests of the engine's books.
use super::*;
use crate::backends::CpuBackend;
use crate::units::MIB;

fn engine(budget: u64) -> AllocationEngine {
    AllocationEngine::new(vec![DeviceSetup {
        backend: Box::new(CpuBackend::new(budget + budget / 4).unwrap()),
        budget,
        pinned: None,
    }])
}

fn spec(size: u64, kind: MemoryAllocationType) -> AllocationSpec {
    AllocationSpec {
        size,
        alignment: 0,
        kind,
        purpose: String::new(),
        persistent: false,
        owner: Owner::Client,
        holder: crate::domain::Caller::anonymous(),
    }
}

fn alloc(e: &mut AllocationEngine, size: u64, kind: MemoryAllocationType) -> Uuid {
    e.try_allocate(0, &spec(size, kind), SystemTime::now())
        .unwrap()
}

#[test]
fn accounting_is_exact() {
    let mut e = engine(16 * MIB);
    let a = alloc(&mut e, 1000, MemoryAllocationType::General);
    let r = alloc(&mut e, MIB, MemoryAllocationType::Reservation);
    assert!(e.allocation_by_id(&r).unwrap().handle.is_none());
    let u = e.usage(0);
    assert_eq!(
        (u.allocated_bytes, u.reservation_bytes, u.allocation_count),
        (1000, MIB, 2)
    );
    assert!(
        u.reserved_bytes >= 1000 && u.reserved_bytes < MIB,
        "reservations hold no memory"
    );
    e.deallocate(&a.to_string(), None).unwrap();
    let u = e.usage(0);
    assert_eq!(u.allocated_bytes, 0);
    assert!(
        u.reserved_bytes <= 16 * 4096,
        "at most a small page cache stays"
    );
}

#[test]
fn budget_limits_and_over_budget() {
    let mut e = engine(MIB);
    assert!(matches!(
        e.try_allocate(
            0,
            &spec(2 * MIB, MemoryAllocationType::General),
            SystemTime::now()
        ),
        Err(EngineError::OverBudget { .. })
    ));
    alloc(&mut e, MIB / 2, MemoryAllocationType::Reservation);
    let before = e.usage(0);
    assert!(matches!(
        e.try_allocate(
            0,
            &spec(MIB / 2 + 1, MemoryAllocationType::General),
            SystemTime::now()
        ),
        Err(EngineError::NoRoom { .. })
    ));
    assert_eq!(e.usage(0), before, "a failure changes nothing");
    // The whole budget is allocatable in one piece.
    let mut e = engine(MIB);
    alloc(&mut e, MIB, MemoryAllocationType::General);
}

#[test]
fn bytes_round_trip_and_bounds() {
    let mut e = engine(MIB);
    let id = alloc(&mut e, 10, MemoryAllocationType::General).to_string();
    e.write(&id, 2, b"abc").unwrap();
    let mut buf = [0u8; 3];
    e.read(&id, 2, &mut buf).unwrap();
    assert_eq!(&buf, b"abc");
    assert!(e.write(&id, 8, b"abc").is_err());
}

#[test]
fn reclaim_takes_cache_then_temporary_oldest_first() {
    let mut e = engine(10 * MIB);
    let g = alloc(&mut e, 2 * MIB, MemoryAllocationType::General);
    let t1 = alloc(&mut e, 2 * MIB, MemoryAllocationType::Temporary);
    let c1 = alloc(&mut e, 2 * MIB, MemoryAllocationType::Cache);
    let c2 = alloc(&mut e, 2 * MIB, MemoryAllocationType::Cache);
    // 80% used; down to 45%: frees c1, c2 (40%), stop.
    let r = e.reclaim(
        0,
        &[MemoryAllocationType::Cache, MemoryAllocationType::Temporary],
        45.0,
        false,
        &[],
    );
    assert_eq!(r.count, 2);
    assert!(e.allocation_by_id(&c1).is_none() && e.allocation_by_id(&c2).is_none());
    assert!(e.allocation_by_id(&t1).is_some() && e.allocation_by_id(&g).is_some());
    let r = e.reclaim(0, &[MemoryAllocationType::Temporary], 0.0, false, &[t1]);
    assert_eq!(r.count, 0, "preserved");
}

#[test]
fn model_owner_matches_its_wire_name() {
    let o = Owner::Model("sdxl".into());
    assert!(o.matches("model:sdxl"));
    assert!(!o.matches("client"));
    assert_eq!(o.wire(), "model:sdxl");
}
