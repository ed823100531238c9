//! `memory.model_renew`: gives a lease a new time limit, from now (contract section 8.5).
//! Answered at once.

use crate::api::parse::{check_ttl, non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ModelRenewResponse;
pub use crate::service::requests::RenewRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.model_renew`.
pub struct ModelRenew;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "RenewRequest")]
struct RenewWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    lease_id: Option<String>,
    /// The new time limit in seconds from now (more than 0, at most 30 days); absent or null:
    /// the limit the lease was last given (over HTTP, 300 for a lease that had none).
    #[schemars(range(max = 2592000))]
    ttl_seconds: Option<f64>,
}

impl RenewRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: RenewWire = parse_data(data)?;
        Ok(RenewRequest {
            lease_id: non_empty(w.lease_id, "lease_id")?,
            ttl_seconds: check_ttl(w.ttl_seconds)?,
        })
    }
}

impl ActionSpec for ModelRenew {
    const NAME: &'static str = "memory.model_renew";
    const ROUTE: Route = Route::post(
        "/v1/leases/{lease_id}/renew",
        "Give a lease a new time limit, from now",
    );
    type Request = RenewRequest;
    type Response = ModelRenewResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<RenewWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<RenewRequest, ProtocolError> {
        RenewRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: RenewRequest) -> Reply<ModelRenewResponse> {
        // Another tenant's lease is not found, as if it did not exist.
        if !cx.service().owns(&cx.caller(), &r.lease_id) {
            return Reply::Now(Err(ProtocolError::new(
                crate::protocol::ErrorCode::LeaseNotFound,
                format!("Lease {} not found", r.lease_id),
            )));
        }
        Reply::Now(cx.service().model_renew(&r, cx.defaults().lease_ttl_seconds))
    }
}
