//! `memory.model_optimize`: offloads or unloads idle models, or fits a budget. On a blocking
//! thread, given a place in the session's bound.

use crate::api::parse::parse_data;
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ModelOptimizeResponse;
pub use crate::service::requests::{ModelStrategy, ModelOptimizeRequest};
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.model_optimize`.
pub struct ModelOptimize;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ModelOptimizeRequest")]
struct ModelOptimizeWire {
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(required)]
    #[schemars(extend("enum" = ["OffloadIdle", "UnloadIdle", "FitBudget"]))]
    strategy: Option<String>,
    #[schemars(range(min = 0))]
    idle_seconds: Option<f64>,
    #[schemars(range(min = 0))]
    target_bytes: Option<i64>,
}

impl ModelOptimizeRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ModelOptimizeWire = parse_data(data)?;
        let strategy = match w
            .strategy
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("offloadidle") => ModelStrategy::OffloadIdle,
            Some("unloadidle") => ModelStrategy::UnloadIdle,
            Some("fitbudget") => ModelStrategy::FitBudget,
            Some(other) => {
                return Err(ProtocolError::invalid_parameter(format!(
                    "field `strategy` must be OffloadIdle, UnloadIdle or FitBudget, got {other}"
                )));
            }
            None => {
                return Err(ProtocolError::invalid_parameter(
                    "field `strategy` is required",
                ));
            }
        };
        let idle_seconds = w.idle_seconds.unwrap_or(300.0);
        if idle_seconds < 0.0 {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `idle_seconds` must be ≥ 0, got {idle_seconds}"
            )));
        }
        let target_bytes = match w.target_bytes {
            Some(t) if t < 0 => {
                return Err(ProtocolError::invalid_parameter(format!(
                    "field `target_bytes` must be ≥ 0, got {t}"
                )));
            }
            t => t.map(|t| t as u64),
        };
        Ok(ModelOptimizeRequest {
            device_id: w.device_id,
            strategy,
            idle_seconds,
            target_bytes,
        })
    }
}

impl ActionSpec for ModelOptimize {
    const NAME: &'static str = "memory.model_optimize";
    const ROUTE: Route = Route::post(
        "/v1/models/optimize",
        "Offload or unload idle models, or fit a budget",
    );
    type Request = ModelOptimizeRequest;
    type Response = ModelOptimizeResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<ModelOptimizeWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<ModelOptimizeRequest, ProtocolError> {
        ModelOptimizeRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: ModelOptimizeRequest) -> Reply<ModelOptimizeResponse> {
        cx.blocking(move |s| s.model_optimize(&r))
    }
}
