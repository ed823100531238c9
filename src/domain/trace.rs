//! Allocation trace operations (the format of assets/traces/README.md), as the replay takes
//! them; `protocol::trace` reads them from their JSON lines.

/// One trace operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceOp {
    /// A live allocation `id` of `size` bytes begins.
    Alloc {
        /// Trace-local id.
        id: u64,
        /// Bytes.
        size: u64,
    },
    /// It ends.
    Free {
        /// Trace-local id.
        id: u64,
    },
}
