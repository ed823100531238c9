//! `memory.get_allocations`: a device's allocations, oldest first, a page at a time. Answered
//! at once.

use crate::api::parse::{MAX_PAGE, non_empty, parse_data};
use crate::api::{ActionSpec, Context, Reply, Route};
use crate::protocol::{MemoryAllocationType, ProtocolError};
pub use crate::protocol::GetAllocationsResponse;
pub use crate::service::requests::GetAllocationsRequest;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;

/// `memory.get_allocations`.
pub struct GetAllocations;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "GetAllocationsRequest")]
struct GetAllocationsWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    allocation_type: Option<MemoryAllocationType>,
    purpose: Option<String>,
    owner: Option<String>,
    tenant: Option<String>,
    client_pid: Option<u32>,
    #[schemars(range(min = 0))]
    offset: Option<i64>,
    #[schemars(range(min = 0, max = 100000))]
    limit: Option<i64>,
}

impl GetAllocationsRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: GetAllocationsWire = parse_data(data)?;
        let offset = w.offset.unwrap_or(0);
        if offset < 0 {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `offset` must be ≥ 0, got {offset}"
            )));
        }
        let limit = w.limit.unwrap_or(1000);
        if !(0..=MAX_PAGE as i64).contains(&limit) {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `limit` must be from 0 to {MAX_PAGE}, got {limit}"
            )));
        }
        Ok(GetAllocationsRequest {
            device_id: non_empty(w.device_id, "device_id")?,
            allocation_type: w.allocation_type,
            purpose: w.purpose,
            owner: w.owner,
            tenant: w.tenant,
            client_pid: w.client_pid,
            offset: offset as u64,
            limit: limit as u64,
        })
    }
}

impl ActionSpec for GetAllocations {
    const NAME: &'static str = "memory.get_allocations";
    const ROUTE: Route = Route::get(
        "/v1/devices/{device_id}/allocations",
        "A device's allocations, oldest first",
    );
    type Request = GetAllocationsRequest;
    type Response = GetAllocationsResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<GetAllocationsWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<GetAllocationsRequest, ProtocolError> {
        GetAllocationsRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, mut r: GetAllocationsRequest) -> Reply<GetAllocationsResponse> {
        let caller = cx.caller();
        if !cx.service().sees_all(&caller) {
            // A tenant lists its own allocations only: its filter on another tenant matches
            // nothing (no tenant is named "": names are checked when read).
            r.tenant = match r.tenant {
                Some(t) if *t != *caller.tenant => Some(String::new()),
                _ => Some(caller.tenant.to_string()),
            };
        }
        Reply::Now(cx.service().get_allocations(&r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse::tests::raw;

    #[test]
    fn paging_limits() {
        let p = |t: &str| GetAllocationsRequest::parse(Some(&raw(t)));
        assert_eq!(p(r#"{"device_id":"cpu"}"#).unwrap().limit, 1000);
        assert!(p(r#"{"device_id":"cpu","limit":100001}"#).is_err());
        assert!(p(r#"{"device_id":"cpu","offset":-1}"#).is_err());
    }
}
