//! `memory.get_transfer`: a transfer's progress. Answered at once.

use crate::api::parse::{non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::MemoryTransfer;
pub use crate::service::requests::TransferIdRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.get_transfer`.
pub struct GetTransfer;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "TransferIdRequest")]
struct TransferIdWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    transfer_id: Option<String>,
}

impl TransferIdRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: TransferIdWire = parse_data(data)?;
        Ok(TransferIdRequest {
            transfer_id: non_empty(w.transfer_id, "transfer_id")?,
        })
    }
}

impl ActionSpec for GetTransfer {
    const NAME: &'static str = "memory.get_transfer";
    const ROUTE: Route = Route::get("/v1/transfers/{transfer_id}", "A transfer's progress");
    type Request = TransferIdRequest;
    type Response = MemoryTransfer;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<TransferIdWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<TransferIdRequest, ProtocolError> {
        TransferIdRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: TransferIdRequest) -> Reply<MemoryTransfer> {
        Reply::Now(cx.service().get_transfer(&r.transfer_id))
    }
}
