//! The wire contract (PROTOCOL.md): envelope, enums, request and response shapes, error codes.
//!
//! Plain data and parsing only; no I/O.

pub mod enums;
pub mod envelope;
pub mod error;
pub mod requests;
pub mod shapes;

pub use enums::*;
pub use error::{ErrorCode, ProtocolError};
pub use shapes::*;
