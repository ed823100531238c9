//! `memory.model_acquire`: leases a model, with a time limit if `ttl_seconds` says so (over
//! HTTP, 300 s when it says nothing: [`crate::api::defaults`]). Answered at once when the model
//! is loaded and home; else it waits (for a load to finish, or for room to bring the model
//! back) on a blocking thread, given a place in the session's bound.

use crate::api::parse::{check_timeout, check_ttl, non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ModelAcquireResponse;
pub use crate::service::requests::ModelAcquireRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.model_acquire`.
pub struct ModelAcquire;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ModelAcquireRequest")]
struct ModelAcquireWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    model_name: Option<String>,
    #[schemars(range(min = 0, max = 3600))]
    timeout_seconds: Option<f64>,
    /// The lease's time limit in seconds (more than 0, at most 30 days); absent or null: until
    /// released (or the session ends); over HTTP, 300.
    #[schemars(range(max = 2592000))]
    ttl_seconds: Option<f64>,
}

impl ModelAcquireRequest {
    /// Parses and checks `data` (an absent `ttl_seconds` stays `None`: the handler fills in
    /// the transport's default).
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ModelAcquireWire = parse_data(data)?;
        Ok(ModelAcquireRequest {
            model_name: non_empty(w.model_name, "model_name")?,
            timeout_seconds: check_timeout(w.timeout_seconds, 30.0)?,
            ttl_seconds: check_ttl(w.ttl_seconds)?,
        })
    }
}

impl ActionSpec for ModelAcquire {
    const NAME: &'static str = "memory.model_acquire";
    const ROUTE: Route = Route::post(
        "/v1/models/{model_name}/acquire",
        "Lease a model (brings an offloaded one back)",
    );
    type Request = ModelAcquireRequest;
    type Response = ModelAcquireResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<ModelAcquireWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<ModelAcquireRequest, ProtocolError> {
        ModelAcquireRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, mut r: ModelAcquireRequest) -> Reply<ModelAcquireResponse> {
        r.ttl_seconds = r.ttl_seconds.or(cx.defaults().lease_ttl_seconds);
        match cx.service().model_acquire_now(&r) {
            Some(done) => Reply::Now(done),
            None => cx.blocking(move |s| s.model_acquire(&r)),
        }
    }
}
