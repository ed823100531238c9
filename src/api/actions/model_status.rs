//! `memory.model_status`: models, their state and bytes. Answered at once.

use crate::api::parse::parse_data;
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ModelStatusResponse;
pub use crate::service::requests::ModelStatusRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.model_status`.
pub struct ModelStatus;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ModelStatusRequest")]
struct ModelStatusWire {
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(length(min = 1))]
    model_name: Option<String>,
}

impl ModelStatusRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ModelStatusWire = parse_data(data)?;
        Ok(ModelStatusRequest {
            device_id: w.device_id,
            model_name: w.model_name,
        })
    }
}

impl ActionSpec for ModelStatus {
    const NAME: &'static str = "memory.model_status";
    const ROUTE: Route = Route::get("/v1/models", "Models, their state and bytes");
    type Request = ModelStatusRequest;
    type Response = ModelStatusResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<ModelStatusWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<ModelStatusRequest, ProtocolError> {
        ModelStatusRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: ModelStatusRequest) -> Reply<ModelStatusResponse> {
        Reply::Now(cx.service().model_status(&r))
    }
}
