//! `memory.list_devices`: every device. Takes no data; answered at once.

use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::ListDevicesResponse;
use schemars::{Schema, SchemaGenerator};
use serde_json::value::RawValue;

/// `memory.list_devices`.
pub struct ListDevices;

impl ActionSpec for ListDevices {
    const NAME: &'static str = "memory.list_devices";
    const ROUTE: Route = Route::get("/v1/devices", "Every device");
    type Request = ();
    type Response = ListDevicesResponse;

    fn data_schema(_: &mut SchemaGenerator) -> Option<Schema> {
        None
    }

    fn parse(_: Option<&RawValue>) -> Result<(), ProtocolError> {
        Ok(())
    }

    fn handle(cx: &Context<'_>, (): ()) -> Reply<ListDevicesResponse> {
        Reply::Now(Ok(cx.service().list_devices()))
    }
}
