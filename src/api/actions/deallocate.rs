//! `memory.deallocate`: frees an allocation. Answered at once.

use crate::api::parse::{non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::DeallocateResponse;
pub use crate::service::requests::DeallocateRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.deallocate`.
pub struct Deallocate;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "DeallocateRequest")]
struct DeallocateWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    allocation_id: Option<String>,
    #[schemars(length(min = 1))]
    device_id: Option<String>,
}

impl DeallocateRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: DeallocateWire = parse_data(data)?;
        Ok(DeallocateRequest {
            allocation_id: non_empty(w.allocation_id, "allocation_id")?,
            device_id: w.device_id,
        })
    }
}

impl ActionSpec for Deallocate {
    const NAME: &'static str = "memory.deallocate";
    const ROUTE: Route = Route::delete("/v1/allocations/{allocation_id}", "Free an allocation");
    type Request = DeallocateRequest;
    type Response = DeallocateResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<DeallocateWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<DeallocateRequest, ProtocolError> {
        DeallocateRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: DeallocateRequest) -> Reply<DeallocateResponse> {
        // Another tenant's allocation is not found, as if it did not exist.
        let service = cx.service();
        Reply::Now(
            service
                .check_visible(&cx.caller(), &r.allocation_id)
                .and_then(|()| service.deallocate(&r)),
        )
    }
}
