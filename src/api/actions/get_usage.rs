//! `memory.get_usage`: a device's counters. Answered at once. Its request, [`DeviceRequest`]
//! (data that names one device), is also `memory.defragment`'s.

use crate::api::parse::{non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::MemoryUsageStats;
pub use crate::service::requests::DeviceRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.get_usage`.
pub struct GetUsage;

/// Wire form of data that names one device.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "DeviceRequest")]
pub(crate) struct DeviceWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
}

impl DeviceRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: DeviceWire = parse_data(data)?;
        Ok(DeviceRequest {
            device_id: non_empty(w.device_id, "device_id")?,
        })
    }
}

impl ActionSpec for GetUsage {
    const NAME: &'static str = "memory.get_usage";
    const ROUTE: Route = Route::get("/v1/devices/{device_id}/usage", "A device's counters");
    type Request = DeviceRequest;
    type Response = MemoryUsageStats;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<DeviceWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<DeviceRequest, ProtocolError> {
        DeviceRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: DeviceRequest) -> Reply<MemoryUsageStats> {
        Reply::Now(cx.service().get_usage(&r))
    }
}
