//! `memory.model_acquire`: leases a model. Answered at once when the model is loaded and home;
//! else it waits (for a load to finish, or for room to bring the model back) on a blocking
//! thread, given a place in the session's bound.

use super::model_unload::{ModelNameWire, ModelRequest};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ModelAcquireResponse;
use schemars::{Schema, SchemaGenerator};
use serde_json::value::RawValue;

/// `memory.model_acquire`.
pub struct ModelAcquire;

impl ActionSpec for ModelAcquire {
    const NAME: &'static str = "memory.model_acquire";
    const ROUTE: Route = Route::post(
        "/v1/models/{model_name}/acquire",
        "Lease a model (brings an offloaded one back)",
    );
    type Request = ModelRequest;
    type Response = ModelAcquireResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<ModelNameWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<ModelRequest, ProtocolError> {
        ModelRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: ModelRequest) -> Reply<ModelAcquireResponse> {
        match cx.service().model_acquire_now(&r) {
            Some(done) => Reply::Now(done),
            None => cx.blocking(move |s| s.model_acquire(&r)),
        }
    }
}
