//! The engine's own vocabulary: ids, kinds, plain-data views and reports, advice and trace
//! operations. The managers and the backends speak only these; `protocol` sits above
//! and owns every conversion to and from the wire (`protocol/convert.rs`). Nothing here
//! imports `protocol` or a JSON library.

mod advice;
mod caller;
mod exports;
mod kinds;
mod tenants;
mod trace;
mod views;

pub use advice::{Advice, SuggestedRequest};
pub use caller::{Caller, DEFAULT_TENANT, SessionId, SessionTransport};
pub use exports::{ExportView, ExportedAllocation, Segment, TensorView, plan_segments};
pub use kinds::{
    AllocationId, DeviceId, MemoryAllocationType, MemoryHealthStatus, MemoryOptimizationType,
    MemoryType, ModelState, PressureLevel, RecommendationKind, TransferMode, TransferStatus,
};
pub use tenants::{ADMIN_TENANT, TenantSpec, Tenants, may_see};
pub use trace::TraceOp;
pub use views::{
    AllocationView, DeviceInfo, Fragmentation, Handle, LeaseView, ModelView, PressureView,
    TransferRecord, UsageStats,
};
