//! `memory.model_load`: loads a safetensors model onto a device. Reading the file and copying
//! its tensors takes a while: on a blocking thread, given a place in the session's bound.

use crate::api::parse::{check_timeout, non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ModelInfo;
pub use crate::service::requests::ModelLoadRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.model_load`.
pub struct ModelLoad;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ModelLoadRequest")]
struct ModelLoadWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    model_name: Option<String>,
    #[schemars(required)]
    #[schemars(length(min = 1))]
    path: Option<String>,
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(range(min = 0))]
    keep_alive_seconds: Option<f64>,
    #[schemars(range(min = 0, max = 3600))]
    timeout_seconds: Option<f64>,
}

impl ModelLoadRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ModelLoadWire = parse_data(data)?;
        if let Some(k) = w.keep_alive_seconds
            && k < 0.0
        {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `keep_alive_seconds` must be ≥ 0, got {k}"
            )));
        }
        Ok(ModelLoadRequest {
            model_name: non_empty(w.model_name, "model_name")?,
            path: non_empty(w.path, "path")?,
            device_id: non_empty(w.device_id, "device_id")?,
            keep_alive_seconds: w.keep_alive_seconds,
            timeout_seconds: check_timeout(w.timeout_seconds, 30.0)?,
            holder: crate::domain::Caller::anonymous(),
        })
    }
}

impl ActionSpec for ModelLoad {
    const NAME: &'static str = "memory.model_load";
    const ROUTE: Route = Route::post("/v1/models", "Load a safetensors model onto a device");
    type Request = ModelLoadRequest;
    type Response = ModelInfo;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<ModelLoadWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<ModelLoadRequest, ProtocolError> {
        ModelLoadRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, mut r: ModelLoadRequest) -> Reply<ModelInfo> {
        r.holder = cx.caller();
        cx.blocking(move |s| s.model_load(&r))
    }
}
