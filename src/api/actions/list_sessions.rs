//! `memory.list_sessions` (the contract's section 8.1): every live session (a stdio worker's
//! stdin, each Unix-socket connection) with its tenant, process and what it holds. Takes no
//! data; answered at once.

use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ListSessionsResponse;
use schemars::{Schema, SchemaGenerator};
use serde_json::value::RawValue;

/// `memory.list_sessions`.
pub struct ListSessions;

impl ActionSpec for ListSessions {
    const NAME: &'static str = "memory.list_sessions";
    const ROUTE: Route = Route::get(
        "/v1/sessions",
        "Every live session (stdio, Unix socket) and what it holds",
    );
    type Request = ();
    type Response = ListSessionsResponse;

    fn data_schema(_: &mut SchemaGenerator) -> Option<Schema> {
        None
    }

    fn parse(_: Option<&RawValue>) -> Result<(), ProtocolError> {
        Ok(())
    }

    fn handle(cx: &Context<'_>, (): ()) -> Reply<ListSessionsResponse> {
        Reply::Now(Ok(cx.service().list_sessions()))
    }
}
