//! `memory.transfer`: moves or copies an allocation to another device. Checked and placed at
//! once, in arrival order (both ends are busy from then on); the destination's pages are
//! faulted in and the bytes copied off the reading thread: on a blocking thread answered when
//! done (`wait_for_completion`), or in the background on a thread the dispatcher owns, the
//! answer (the transfer, Running) given at once.

use crate::api::parse::{non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::MemoryTransfer;
pub use crate::service::requests::TransferRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.transfer`.
pub struct Transfer;

/// How a transfer treats its source (the engine's own kind).
pub use crate::domain::TransferMode;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "TransferRequest")]
struct TransferWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    allocation_id: Option<String>,
    #[schemars(required)]
    #[schemars(length(min = 1))]
    source_device_id: Option<String>,
    #[schemars(required)]
    #[schemars(length(min = 1))]
    destination_device_id: Option<String>,
    #[schemars(extend("enum" = ["move", "copy", null]))]
    mode: Option<String>,
    wait_for_completion: Option<bool>,
}

impl TransferRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: TransferWire = parse_data(data)?;
        let mode = match w.mode.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("move") => TransferMode::Move,
            Some("copy") => TransferMode::Copy,
            Some(other) => {
                return Err(ProtocolError::invalid_parameter(format!(
                    "field `mode` must be \"move\" or \"copy\", got \"{other}\""
                )));
            }
        };
        Ok(TransferRequest {
            allocation_id: non_empty(w.allocation_id, "allocation_id")?,
            source_device_id: non_empty(w.source_device_id, "source_device_id")?,
            destination_device_id: non_empty(w.destination_device_id, "destination_device_id")?,
            mode,
            wait_for_completion: w.wait_for_completion.unwrap_or(false),
        })
    }
}

impl ActionSpec for Transfer {
    const NAME: &'static str = "memory.transfer";
    const ROUTE: Route = Route::post(
        "/v1/transfers",
        "Move or copy an allocation to another device",
    );
    type Request = TransferRequest;
    type Response = MemoryTransfer;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<TransferWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<TransferRequest, ProtocolError> {
        TransferRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: TransferRequest) -> Reply<MemoryTransfer> {
        // Another tenant's allocation is not found, as if it did not exist.
        if let Err(e) = cx.service().check_visible(&cx.caller(), &r.allocation_id) {
            return Reply::Now(Err(e));
        }
        let ticket = match cx.admit() {
            Ok(t) => t,
            Err(e) => return Reply::Now(Err(e)),
        };
        let started = match cx.service().start_transfer(&r) {
            Ok(t) => t,
            Err(e) => return Reply::Now(Err(e)),
        };
        if r.wait_for_completion {
            return cx.blocking_admitted(ticket, move |s| s.run_transfer(started));
        }
        let answer = started.wire.clone();
        cx.background("transfer", ticket, move |s| {
            if let Err(e) = s.run_transfer(started) {
                tracing::warn!("{}", e.message);
            }
        });
        Reply::Now(Ok(answer))
    }
}
