//! `memory.optimize`: frees memory (ClearCache, Defragment, EvictIdleModels, ReduceToTarget,
//! Full). With `wait_for_completion` (the default) it runs on a blocking thread and answers
//! when done; without, it answers "scheduled" at once and runs in the background, on a thread
//! the dispatcher owns, holding its place in the session's bound until it ends.

use crate::api::parse::{non_empty, parse_data, required};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::{MemoryOptimizationType, ProtocolError};
pub use crate::protocol::OptimizeResponse;
pub use crate::service::requests::OptimizeRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.optimize`.
pub struct Optimize;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "OptimizeRequest")]
struct OptimizeWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(required)]
    optimization_type: Option<MemoryOptimizationType>,
    force: Option<bool>,
    #[schemars(range(min = 0, max = 100))]
    target_usage_percentage: Option<f64>,
    preserve_allocations: Option<Vec<String>>,
    wait_for_completion: Option<bool>,
}

impl OptimizeRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: OptimizeWire = parse_data(data)?;
        let device_id = non_empty(w.device_id, "device_id")?;
        let optimization_type = required(w.optimization_type, "optimization_type")?;
        if let Some(t) = w.target_usage_percentage
            && !(0.0..=100.0).contains(&t)
        {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `target_usage_percentage` must be from 0 to 100, got {t}"
            )));
        }
        if optimization_type == MemoryOptimizationType::ReduceToTarget
            && w.target_usage_percentage.is_none()
        {
            return Err(ProtocolError::invalid_parameter(
                "field `target_usage_percentage` is required for ReduceToTarget",
            ));
        }
        Ok(OptimizeRequest {
            device_id,
            optimization_type,
            force: w.force.unwrap_or(false),
            target_usage_percentage: w.target_usage_percentage,
            preserve_allocations: w.preserve_allocations.unwrap_or_default(),
            wait_for_completion: w.wait_for_completion.unwrap_or(true),
        })
    }
}

impl ActionSpec for Optimize {
    const NAME: &'static str = "memory.optimize";
    const ROUTE: Route = Route::post(
        "/v1/devices/{device_id}/optimize",
        "Free memory: ClearCache, Defragment, EvictIdleModels, ReduceToTarget, Full",
    );
    type Request = OptimizeRequest;
    type Response = OptimizeResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<OptimizeWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<OptimizeRequest, ProtocolError> {
        OptimizeRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, req: OptimizeRequest) -> Reply<OptimizeResponse> {
        let admitted = cx
            .service()
            .check_device(&req.device_id)
            .and_then(|usage| Ok((usage, cx.admit()?)));
        let (usage, ticket) = match admitted {
            Ok(a) => a,
            Err(e) => return Reply::Now(Err(e)),
        };
        if req.wait_for_completion {
            return cx.blocking_admitted(ticket, move |s| s.optimize(&req));
        }
        let scheduled = OptimizeResponse {
            device_id: req.device_id.clone(),
            optimization_type: req.optimization_type,
            freed_bytes: 0,
            actions: vec!["scheduled".to_string()],
            usage_before: usage,
            usage_after: usage,
            duration_ms: 0.0,
        };
        cx.background("optimize", ticket, move |s| {
            if let Err(e) = s.optimize(&req) {
                tracing::warn!("background optimize of {} failed: {e}", req.device_id);
            }
        });
        Reply::Now(Ok(scheduled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse::tests::raw;

    #[test]
    fn optimize_needs_a_type_and_a_target_for_reduce() {
        let p = |t: &str| OptimizeRequest::parse(Some(&raw(t)));
        let r = p(r#"{"device_id":"cpu","optimization_type":"defragment"}"#).unwrap();
        assert!(r.wait_for_completion);
        assert_eq!(r.optimization_type, MemoryOptimizationType::Defragment);
        assert!(p(r#"{"device_id":"cpu"}"#).is_err());
        assert!(p(r#"{"device_id":"cpu","optimization_type":3}"#).is_err());
        assert!(
            p(r#"{"device_id":"cpu","optimization_type":3,"target_usage_percentage":101}"#)
                .is_err()
        );
        let r = p(r#"{"device_id":"cpu","optimization_type":3,"target_usage_percentage":50,"preserve_allocations":["a"]}"#).unwrap();
        assert_eq!(r.preserve_allocations, vec!["a".to_string()]);
    }
}
