//! Managers: the core of memcoord. Plain data in, plain data out; no I/O of their own (the
//! backends they own do the system calls) and nothing printed.

pub mod advisor;
pub mod allocations;
pub mod analytics;
pub mod arena;
pub mod clock;
pub mod exports;
pub mod health;
pub mod models;
pub mod pressure;
pub mod records;
pub mod replay;
pub mod room;
pub mod sessions;
pub mod tally;
pub mod tlsf;
pub mod transfers;

pub use allocations::{AllocationEngine, AllocationSpec, DeviceSetup, EngineError, Owner};
pub use arena::{Arena, ArenaError, Placement};
