//! `memory.export` (the contract's section 8.3): makes an `shm` allocation, or a model resident
//! on `shm` under a lease, mappable by another process through the claim socket. Answered at
//! once.

use crate::api::parse::parse_data;
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ExportInfo;
pub use crate::service::requests::ExportRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.export`.
pub struct Export;

/// The longest a secret may wait for its claim: a day.
pub const MAX_CLAIM_SECONDS: f64 = 86_400.0;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ExportRequest")]
struct ExportWire {
    /// The allocation to export (or `model_name` with `lease_id`).
    #[schemars(length(min = 1))]
    allocation_id: Option<String>,
    /// The model to export, with `lease_id`.
    #[schemars(length(min = 1))]
    model_name: Option<String>,
    /// A lease on the model: the export ends with it.
    #[schemars(length(min = 1))]
    lease_id: Option<String>,
    /// How long the secret may be claimed (default 60 s).
    #[schemars(range(min = 0, max = 86400))]
    claim_seconds: Option<f64>,
}

fn given(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

impl ExportRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ExportWire = parse_data(data)?;
        let (allocation_id, model_name, lease_id) = (
            given(w.allocation_id),
            given(w.model_name),
            given(w.lease_id),
        );
        match (&allocation_id, &model_name, &lease_id) {
            (Some(_), None, None) | (None, Some(_), Some(_)) => {}
            (Some(_), Some(_), _) => {
                return Err(ProtocolError::invalid_parameter(
                    "give `allocation_id` or `model_name`, not both",
                ));
            }
            (Some(_), None, Some(_)) => {
                return Err(ProtocolError::invalid_parameter(
                    "`lease_id` goes with `model_name`; an allocation is exported by \
                     `allocation_id` alone",
                ));
            }
            (None, Some(_), None) => {
                return Err(ProtocolError::invalid_parameter(
                    "field `lease_id` is required with `model_name`: a model is exported under \
                     a lease (memory.model_acquire), and the export ends with it",
                ));
            }
            (None, None, _) => {
                return Err(ProtocolError::invalid_parameter(
                    "field `allocation_id` (or `model_name` with `lease_id`) is required",
                ));
            }
        }
        let claim_seconds = w.claim_seconds.unwrap_or(60.0);
        if !(claim_seconds > 0.0 && claim_seconds <= MAX_CLAIM_SECONDS) {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `claim_seconds` must be more than 0 and at most {MAX_CLAIM_SECONDS}, got \
                 {claim_seconds}"
            )));
        }
        Ok(ExportRequest {
            allocation_id,
            model_name,
            lease_id,
            claim_seconds,
        })
    }
}

impl ActionSpec for Export {
    const NAME: &'static str = "memory.export";
    const ROUTE: Route = Route::post(
        "/v1/exports",
        "Export shm memory (an allocation, or a leased model) to another process",
    );
    type Request = ExportRequest;
    type Response = ExportInfo;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<ExportWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<ExportRequest, ProtocolError> {
        ExportRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: ExportRequest) -> Reply<ExportInfo> {
        // Another tenant's allocation is not found, as if it did not exist.
        if let Some(id) = &r.allocation_id
            && let Err(e) = cx.service().check_visible(&cx.caller(), id)
        {
            return Reply::Now(Err(e));
        }
        Reply::Now(cx.service().export(&r))
    }
}
