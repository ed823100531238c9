//! `memory.clear`: frees every client allocation of a device. Answered at once.

use crate::api::parse::{non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ClearResponse;
pub use crate::service::requests::ClearRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.clear`.
pub struct Clear;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ClearRequest")]
struct ClearWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    force: Option<bool>,
}

impl ClearRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ClearWire = parse_data(data)?;
        Ok(ClearRequest {
            device_id: non_empty(w.device_id, "device_id")?,
            force: w.force.unwrap_or(false),
        })
    }
}

impl ActionSpec for Clear {
    const NAME: &'static str = "memory.clear";
    const ROUTE: Route = Route::post(
        "/v1/devices/{device_id}/clear",
        "Free every client allocation of a device",
    );
    type Request = ClearRequest;
    type Response = ClearResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<ClearWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<ClearRequest, ProtocolError> {
        ClearRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: ClearRequest) -> Reply<ClearResponse> {
        // A tenant clears its own allocations only; the operator (or anyone, without tenants)
        // every one.
        let caller = cx.caller();
        let service = cx.service();
        let tenant = (!service.sees_all(&caller)).then_some(&*caller.tenant);
        Reply::Now(service.clear_of(&r, tenant))
    }
}
