//! `memory.optimization_recs`: advice, each with the request that applies it. Working out a
//! defragment's outcome walks a device's allocations: on a blocking thread, given a place in
//! the session's bound.

use super::get_pressure::{OptionalDeviceRequest, OptionalDeviceWire};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::OptimizationRecsResponse;
use schemars::{Schema, SchemaGenerator};
use serde_json::value::RawValue;

/// `memory.optimization_recs`.
pub struct OptimizationRecs;

impl ActionSpec for OptimizationRecs {
    const NAME: &'static str = "memory.optimization_recs";
    const ROUTE: Route = Route::get(
        "/v1/recommendations",
        "Advice with the request that applies it",
    );
    type Request = OptionalDeviceRequest;
    type Response = OptimizationRecsResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<OptionalDeviceWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<OptionalDeviceRequest, ProtocolError> {
        OptionalDeviceRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: OptionalDeviceRequest) -> Reply<OptimizationRecsResponse> {
        cx.blocking(move |s| s.optimization_recs(&r))
    }
}
