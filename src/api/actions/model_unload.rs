//! `memory.model_unload`: unloads a model. Answered at once. Its request, [`ModelRequest`]
//! (a model by name), is also `memory.model_acquire`'s.

use crate::api::parse::{check_timeout, non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ModelUnloadResponse;
pub use crate::service::requests::ModelRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.model_unload`.
pub struct ModelUnload;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ModelNameRequest")]
pub(crate) struct ModelNameWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    model_name: Option<String>,
    force: Option<bool>,
    #[schemars(range(min = 0, max = 3600))]
    timeout_seconds: Option<f64>,
}

impl ModelRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ModelNameWire = parse_data(data)?;
        Ok(ModelRequest {
            model_name: non_empty(w.model_name, "model_name")?,
            force: w.force.unwrap_or(false),
            timeout_seconds: check_timeout(w.timeout_seconds, 30.0)?,
        })
    }
}

impl ActionSpec for ModelUnload {
    const NAME: &'static str = "memory.model_unload";
    const ROUTE: Route = Route::delete("/v1/models/{model_name}", "Unload a model");
    type Request = ModelRequest;
    type Response = ModelUnloadResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<ModelNameWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<ModelRequest, ProtocolError> {
        ModelRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: ModelRequest) -> Reply<ModelUnloadResponse> {
        Reply::Now(cx.service().model_unload(&r))
    }
}
