//! Transports: bytes in, bytes out. They frame requests, read the envelope (`request_id`,
//! action, `data`) or a REST route into a typed request, hand it to dispatch and write the
//! answers; what each action does is `api`'s.

pub mod claim;
pub mod framing;
pub mod http;
pub mod lines;
pub mod openapi;
pub mod server;
pub mod spin;
pub mod stdio;
pub mod unix;

pub use crate::runtime::Shutdown;
