//! The wire contract (PROTOCOL.md): envelope, enums, response shapes, error codes. Each
//! action's request is parsed in its own file (`api/actions/`).
//!
//! Plain data and parsing only; no I/O.

mod de;
pub mod enums;
pub mod envelope;
pub mod error;
pub mod shapes;

pub use enums::*;
pub use error::{ErrorCode, ProtocolError};
pub use shapes::*;
