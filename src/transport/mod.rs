//! Transports: bytes in, bytes out. They frame requests, hand them to dispatch and write the
//! responses; they know nothing of actions.

pub mod framing;
pub mod http;
pub mod openapi;
pub mod routes;
pub mod server;
pub mod stdio;

pub use crate::runtime::Shutdown;
