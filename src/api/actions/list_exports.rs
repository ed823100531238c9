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
        // A tenant lists its own exports only (the operator every one).
        let (caller, service) = (cx.caller(), cx.service());
        let mut listed = service.list_exports();
        listed.exports.retain(|x| service.owns(&caller, &x.export_id));
        Reply::Now(Ok(listed))
    }
}
