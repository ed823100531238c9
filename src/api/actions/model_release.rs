//! `memory.model_release`: ends a lease. Answered at once.

use crate::api::parse::{non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ModelReleaseResponse;
pub use crate::service::requests::LeaseRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.model_release`.
pub struct ModelRelease;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "LeaseRequest")]
struct LeaseWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    lease_id: Option<String>,
}

impl LeaseRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: LeaseWire = parse_data(data)?;
        Ok(LeaseRequest {
            lease_id: non_empty(w.lease_id, "lease_id")?,
        })
    }
}

impl ActionSpec for ModelRelease {
    const NAME: &'static str = "memory.model_release";
    const ROUTE: Route = Route::delete("/v1/leases/{lease_id}", "End a lease");
    type Request = LeaseRequest;
    type Response = ModelReleaseResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<LeaseWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<LeaseRequest, ProtocolError> {
        LeaseRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: LeaseRequest) -> Reply<ModelReleaseResponse> {
        // Another tenant's lease is not found, as if it did not exist.
        if !cx.service().owns(&cx.caller(), &r.lease_id) {
            return Reply::Now(Err(ProtocolError::new(
                crate::protocol::ErrorCode::LeaseNotFound,
                format!("Lease {} not found", r.lease_id),
            )));
        }
        Reply::Now(cx.service().model_release(&r))
    }
}
