//! `memory.unexport` (the contract's section 8.3): ends an export. Answered at once.

use crate::api::parse::{non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::UnexportResponse;
pub use crate::service::requests::ExportIdRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.unexport`.
pub struct Unexport;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ExportIdRequest")]
struct ExportIdWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    export_id: Option<String>,
}

impl ExportIdRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ExportIdWire = parse_data(data)?;
        Ok(ExportIdRequest {
            export_id: non_empty(w.export_id, "export_id")?,
        })
    }
}

impl ActionSpec for Unexport {
    const NAME: &'static str = "memory.unexport";
    const ROUTE: Route = Route::delete("/v1/exports/{export_id}", "End an export");
    type Request = ExportIdRequest;
    type Response = UnexportResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<ExportIdWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<ExportIdRequest, ProtocolError> {
        ExportIdRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: ExportIdRequest) -> Reply<UnexportResponse> {
        // Another tenant's export is not found, as if it did not exist.
        if !cx.service().owns(&cx.caller(), &r.export_id) {
            return Reply::Now(Err(ProtocolError::new(
                crate::protocol::ErrorCode::ExportNotFound,
                format!("Export {} not found: it ended, or never existed", r.export_id),
            )));
        }
        Reply::Now(cx.service().unexport(&r))
    }
}
