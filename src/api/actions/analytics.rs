//! `memory.analytics`: history, size histogram, latency, purposes. Answered at once.

use crate::api::parse::parse_data;
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::ProtocolError;
pub use crate::protocol::GetAnalyticsResponse;
pub use crate::service::requests::AnalyticsRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.analytics`.
pub struct Analytics;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "AnalyticsRequest")]
struct AnalyticsWire {
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(range(min = 1, max = 3600))]
    window_seconds: Option<f64>,
}

impl AnalyticsRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: AnalyticsWire = parse_data(data)?;
        let window = w.window_seconds.unwrap_or(3600.0);
        if !(1.0..=3600.0).contains(&window) {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `window_seconds` must be from 1 to 3600, got {window}"
            )));
        }
        Ok(AnalyticsRequest {
            device_id: w.device_id,
            window_seconds: window.ceil() as u64,
        })
    }
}

impl ActionSpec for Analytics {
    const NAME: &'static str = "memory.analytics";
    const ROUTE: Route = Route::get("/v1/analytics", "History, size histogram, latency, purposes");
    type Request = AnalyticsRequest;
    type Response = GetAnalyticsResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<AnalyticsWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<AnalyticsRequest, ProtocolError> {
        AnalyticsRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, r: AnalyticsRequest) -> Reply<GetAnalyticsResponse> {
        Reply::Now(cx.service().analytics(&r))
    }
}
