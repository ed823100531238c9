//! `memory.get_pressure`: memory pressure per device. Answered at once. Its request,
//! [`OptionalDeviceRequest`] (one device or every device), is also
//! `memory.optimization_recs`'s.

use crate::api::parse::parse_data;
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::GetPressureResponse;
pub use crate::service::requests::OptionalDeviceRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.get_pressure`.
pub struct GetPressure;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "OptionalDeviceRequest")]
pub(crate) struct OptionalDeviceWire {
    #[schemars(length(min = 1))]
    device_id: Option<String>,
}

impl OptionalDeviceRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: OptionalDeviceWire = parse_data(data)?;
        Ok(OptionalDeviceRequest {
            device_id: w.device_id,
        })
    }
}

impl ActionSpec for GetPressure {
    const NAME: &'static str = "memory.get_pressure";
    const ROUTE: Route = Route::get("/v1/pressure", "Memory pressure per device");
    type Request = OptionalDeviceRequest;
    type Response = GetPressureResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<OptionalDeviceWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<OptionalDeviceRequest, ProtocolError> {
        OptionalDeviceRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: OptionalDeviceRequest) -> Reply<GetPressureResponse> {
        Reply::Now(cx.service().get_pressure(&r))
    }
}
