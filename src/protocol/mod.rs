//! The wire contract (documented in docs/protocol.md): envelope, enums, response shapes, error codes. Each
//! action's request is parsed in its own file (`api/actions/`).
//!
//! Plain data and parsing only; no I/O. The engine's types live in [`crate::domain`];
//! `convert.rs` turns them into the wire shapes, `trace.rs` reads allocation traces.

pub mod convert;
mod de;
pub mod enums;
pub mod envelope;
pub mod error;
pub mod exports;
pub mod sessions;
pub mod shapes;
pub mod trace;

pub use enums::*;
pub use error::{ErrorCode, ProtocolError};
pub use exports::*;
pub use sessions::*;
pub use shapes::*;
