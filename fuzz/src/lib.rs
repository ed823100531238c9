//! memcoord's fuzzing harness, shared by the cargo-fuzz targets in `fuzz_targets/`. The same
//! file, `harness.rs`, is compiled into the stable smoke test `tests/fuzz_smoke.rs`.

mod harness;
pub use harness::*;
