//! `memory.defragment`: compacts a device's allocations. It holds the engine in passes, so it
//! runs on a blocking thread (given a place in the session's bound first).

use super::get_usage::{DeviceRequest, DeviceWire};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::DefragmentResponse;
use schemars::{Schema, SchemaGenerator};
use serde_json::value::RawValue;

/// `memory.defragment`.
pub struct Defragment;

impl ActionSpec for Defragment {
    const NAME: &'static str = "memory.defragment";
    const ROUTE: Route = Route::post(
        "/v1/devices/{device_id}/defragment",
        "Compact a device's allocations",
    );
    type Request = DeviceRequest;
    type Response = DefragmentResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<DeviceWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<DeviceRequest, ProtocolError> {
        DeviceRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: DeviceRequest) -> Reply<DefragmentResponse> {
        cx.blocking(move |s| s.defragment(&r.device_id, &[]))
    }
}
