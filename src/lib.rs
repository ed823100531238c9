//! memcoord: the memory coordinator for machine-learning inference hosts.
//!
//! Data flows one way:
//! [`transport`] (stdio) → [`dispatch`] (action → typed request → call → response) →
//! [`service`] (one method per action) → [`managers`] (allocation engine, arenas) →
//! [`backends`] (host memory). [`protocol`] holds the wire contract's types; [`runtime`] the
//! lifecycle (one shutdown signal every transport awaits, the threads it stops).
//!
//! As a library: build devices with [`config::Settings::host_devices`], wrap them in a
//! [`service::MemoryService`], and call its methods; allocations' bytes are read and written
//! with [`service::MemoryService::read`] and [`service::MemoryService::write`]. With a state
//! directory ([`service::MemoryService::with_state_dir`]) every call records persistent `shm`
//! allocations before it returns; [`service::MemoryService::shut_down`] ends it.

// The only module that may use `unsafe` (the lint is denied elsewhere, Cargo.toml): the
// operating system's and the driver's memory calls, signals, and file calls `std` lacks.
#[allow(unsafe_code)]
pub mod backends;
pub mod config;
pub mod dispatch;
pub mod managers;
pub mod metrics;
pub mod protocol;
pub mod runtime;
pub mod service;
pub mod transport;
pub mod units;
