//! `memory.get_status`: a device's figures, usage, allocations and fragmentation. Answered at
//! once.

use crate::api::parse::{non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::GetMemoryStatusResponse;
pub use crate::service::requests::GetStatusRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.get_status`.
pub struct GetStatus;

/// Wire form of `memory.get_status`'s data.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "GetStatusRequest")]
struct GetStatusWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    include_allocations: Option<bool>,
    include_usage_stats: Option<bool>,
    include_fragmentation: Option<bool>,
}

impl GetStatusRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: GetStatusWire = parse_data(data)?;
        Ok(GetStatusRequest {
            device_id: non_empty(w.device_id, "device_id")?,
            include_allocations: w.include_allocations.unwrap_or(true),
            include_usage_stats: w.include_usage_stats.unwrap_or(true),
            include_fragmentation: w.include_fragmentation.unwrap_or(false),
        })
    }
}

impl ActionSpec for GetStatus {
    const NAME: &'static str = "memory.get_status";
    const ROUTE: Route = Route::get(
        "/v1/devices/{device_id}/status",
        "A device's figures, usage, allocations and fragmentation",
    );
    type Request = GetStatusRequest;
    type Response = GetMemoryStatusResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<GetStatusWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<GetStatusRequest, ProtocolError> {
        GetStatusRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: GetStatusRequest) -> Reply<GetMemoryStatusResponse> {
        let caller = cx.caller();
        let service = cx.service();
        let mut status = service.get_status(&r);
        // A tenant sees its own allocations only (the operator every one).
        if let Ok(s) = &mut status
            && !service.sees_all(&caller)
        {
            s.allocations
                .retain(|a| crate::domain::may_see(&caller.tenant, &a.tenant));
        }
        Reply::Now(status)
    }
}
