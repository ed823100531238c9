//! memcoord: the memory coordinator for machine-learning inference hosts.
//!
//! Data flows one way:
//! [`transport`] (stdio, HTTP: the envelope) → [`dispatch`] (typed request → call → typed
//! answer) → [`api`] (one file per action: request, response, route, scheduling, handler) →
//! [`service`] (one method per action) → [`managers`] (allocation engine, arenas) →
//! [`backends`] (host memory). [`domain`] holds what the engine, managers and backends speak
//! (ids, kinds, plain-data views); [`protocol`] holds the wire contract's types and every
//! conversion between the two; [`runtime`] the lifecycle (one shutdown signal every
//! transport awaits, the threads it stops).
//!
//! As a library: build devices with [`config::Settings::host_devices`], wrap them in a
//! [`service::MemoryService`], and call its methods; allocations' bytes are read and written
//! with [`service::MemoryService::read`] and [`service::MemoryService::write`]. With a state
//! directory ([`service::MemoryService::with_state_dir`]) every call records persistent `shm`
//! allocations before it returns; [`service::MemoryService::shut_down`] ends it.

// The only module that may use `unsafe` (the lint is denied elsewhere, Cargo.toml): the
// operating system's and the driver's memory calls, signals, and file calls `std` lacks.
pub mod api;
#[allow(unsafe_code)]
pub mod backends;
pub mod config;
pub mod dispatch;
pub mod domain;
pub mod managers;
pub mod metrics;
pub mod protocol;
pub mod runtime;
pub mod service;
pub mod transport;
pub mod units;
