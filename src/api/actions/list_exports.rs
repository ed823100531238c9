//! `memory.list_exports` (the contract's section 8.3): every live export, without secrets.
//! Takes no data; answered at once.

use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ListExportsResponse;
use schemars::{Schema, SchemaGenerator};
use serde_json::value::RawValue;

/// `memory.list_exports`.
pub struct ListExports;

impl ActionSpec for ListExports {
    const NAME: &'static str = "memory.list_exports";
    const ROUTE: Route = Route::get("/v1/exports", "Every live export (no secrets)");
    type Request = ();
    type Response = ListExportsResponse;

    fn data_schema(_: &mut SchemaGenerator) -> Option<Schema> {
        None
    }

    fn parse(_: Option<&RawValue>) -> Result<(), ProtocolError> {
        Ok(())
    }

    fn handle(cx: &Context<'_>, (): ()) -> Reply<ListExportsResponse> {
        Reply::Now(Ok(cx.service().list_exports()))
    }
}
