//! Property tests of the engine: random sequences of allocate, free, defragment and trim never
//! overlap live allocations, respect alignment, keep accounting exact, keep every byte through
//! defragmentation, and end at zero reserved once everything is freed.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use memcoord::backends::CpuBackend;
use memcoord::managers::{AllocationEngine, AllocationSpec, DeviceSetup, Owner};
use memcoord::protocol::MemoryAllocationType;
use proptest::prelude::*;
use std::time::SystemTime;
use uuid::Uuid;

const BUDGET: u64 = 8 << 20;

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        size: u64,
        align_log2: u8,
        persistent: bool,
    },
    Free(usize),
    Defragment(u64),
    Trim,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u64..200_000, 0u8..14, prop::bool::weighted(0.1))
            .prop_map(|(size, align_log2, persistent)| Op::Alloc { size, align_log2, persistent }),
        4 => any::<usize>().prop_map(Op::Free),
        1 => prop_oneof![Just(u64::MAX), 1u64..300_000].prop_map(Op::Defragment),
        1 => Just(Op::Trim),
    ]
}

fn fill(seed: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(131).wrapping_add(i * 7) % 251) as u8)
        .collect()
}

struct Live {
    id: Uuid,
    size: u64,
    align: u64,
    seed: u64,
}

fn check(e: &AllocationEngine, live: &[Live]) {
    let usage = e.usage(0);
    let total: u64 = live.iter().map(|l| l.size).sum();
    assert_eq!(
        usage.allocated_bytes, total,
        "allocated = sum of live sizes"
    );
    assert!(
        usage.reserved_bytes >= usage.allocated_bytes,
        "reserved ≥ allocated"
    );
    assert_eq!(usage.allocation_count, live.len() as u64);
    let mut spans: Vec<(u64, u64)> = live
        .iter()
        .map(|l| {
            let (offset, size) = e
                .placement_of(&l.id)
                .expect("live allocation has a placement");
            assert_eq!(size, l.size);
            assert_eq!(offset % l.align.max(1), 0, "alignment {} honoured", l.align);
            (offset, offset + size)
        })
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "live allocations overlap: {w:?}");
    }
}

fn verify_bytes(e: &AllocationEngine, live: &[Live]) {
    for l in live {
        let mut buf = vec![0; l.size as usize];
        e.read(&l.id.to_string(), 0, &mut buf).unwrap();
        assert!(
            buf == fill(l.seed, l.size),
            "allocation {} lost bytes",
            l.id
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_every_invariant(ops in prop::collection::vec(op(), 1..120)) {
        let mut e = AllocationEngine::new(vec![DeviceSetup {
            backend: Box::new(CpuBackend::new(BUDGET + BUDGET / 4).unwrap()),
            budget: BUDGET,
            pinned: None,
        }]);
        let mut live: Vec<Live> = Vec::new();
        let mut seed = 0u64;
        for op in ops {
            match op {
                Op::Alloc { size, align_log2, persistent } => {
                    let align = if align_log2 == 0 { 0 } else { 1u64 << align_log2 };
                    let spec = AllocationSpec {
                        size,
                        alignment: align,
                        kind: MemoryAllocationType::General,
                        purpose: String::new(),
                        persistent,
                        owner: Owner::Client,
                        holder: memcoord::domain::Caller::anonymous(),
                    };
                    let before = e.usage(0);
                    match e.try_allocate(0, &spec, SystemTime::now()) {
                        Ok(id) => {
                            seed += 1;
                            e.write(&id.to_string(), 0, &fill(seed, size)).unwrap();
                            live.push(Live { id, size, align, seed });
                        }
                        Err(_) => {
                            let after = e.usage(0);
                            prop_assert_eq!(before.allocated_bytes, after.allocated_bytes);
                            prop_assert_eq!(before.reserved_bytes, after.reserved_bytes);
                            prop_assert_eq!(before.allocation_count, after.allocation_count);
                        }
                    }
                }
                Op::Free(i) => {
                    if !live.is_empty() {
                        let l = live.swap_remove(i % live.len());
                        prop_assert!(e.free_id(&l.id).is_some());
                    }
                }
                Op::Defragment(max_bytes) => {
                    e.defragment_pass(0, max_bytes, &[]);
                    verify_bytes(&e, &live);
                }
                Op::Trim => {
                    e.trim(0);
                }
            }
            check(&e, &live);
        }
        verify_bytes(&e, &live);
        for l in live.drain(..) {
            e.free_id(&l.id);
        }
        e.trim(0);
        let u = e.usage(0);
        prop_assert_eq!(u.allocated_bytes, 0);
        prop_assert_eq!(u.reserved_bytes, 0, "zero reserved once everything is freed");
        let f = e.fragmentation(0);
        prop_assert_eq!(f.free_block_count, 1, "one free range again");
    }

    #[test]
    fn persistent_allocations_never_move(sizes in prop::collection::vec(1u64..50_000, 2..40)) {
        let mut e = AllocationEngine::new(vec![DeviceSetup {
            backend: Box::new(CpuBackend::new(BUDGET + BUDGET / 4).unwrap()),
            budget: BUDGET,
            pinned: None,
        }]);
        let mut ids = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let spec = AllocationSpec {
                size: *size,
                alignment: 0,
                kind: MemoryAllocationType::General,
                purpose: String::new(),
                persistent: i % 3 == 0,
                owner: Owner::Client,
                holder: memcoord::domain::Caller::anonymous(),
            };
            ids.push((e.try_allocate(0, &spec, SystemTime::now()).unwrap(), i % 3 == 0));
        }
        for (k, (id, _)) in ids.iter().enumerate() {
            if k % 2 == 1 {
                e.free_id(id);
            }
        }
        let before: Vec<_> = ids.iter().map(|(id, p)| (e.placement_of(id), *p)).collect();
        let pass = e.defragment_pass(0, u64::MAX, &[]);
        for ((id, persistent), (was, _)) in ids.iter().zip(before) {
            if *persistent {
                prop_assert_eq!(e.placement_of(id), was);
            }
        }
        let pinned = ids.iter().enumerate().filter(|(k, (_, p))| *p && k % 2 == 0).count() as u64;
        prop_assert_eq!(pass.fixed_count, pinned);
    }
}
