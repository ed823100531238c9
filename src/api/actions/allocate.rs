//! `memory.allocate`: memory on a device. Its own scheduling: placed at once when there is room
//! (in arrival order, on the reading thread); else, given a place in the session's bound, it
//! waits for room on the runtime, and a large one is placed on a blocking thread first.

use crate::api::parse::{MAX_ALIGNMENT, check_size, check_timeout, non_empty, parse_data, required};
use crate::api::{ActionSpec, Context, Reply, Route, internal_error};
use crate::protocol::{MemoryAllocationType, ProtocolError};
pub use crate::protocol::AllocateMemoryResponse;
pub use crate::service::requests::AllocateRequest;
use crate::service::TryAllocate;
use schemars::{Schema, SchemaGenerator};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::sync::Arc;

/// `memory.allocate`.
pub struct Allocate;

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "AllocateRequest")]
struct AllocateWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(required)]
    #[schemars(range(min = 1))]
    size_bytes: Option<i64>,
    allocation_type: Option<MemoryAllocationType>,
    #[schemars(extend("enum" = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864, 134217728, 268435456, 536870912, 1073741824, null]))]
    alignment: Option<i64>,
    purpose: Option<String>,
    persistent: Option<bool>,
    #[schemars(range(min = 0, max = 3600))]
    timeout_seconds: Option<f64>,
}

impl AllocateRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: AllocateWire = parse_data(data)?;
        let device_id = non_empty(w.device_id, "device_id")?;
        let size_bytes = check_size(required(w.size_bytes, "size_bytes")?, "size_bytes")?;
        let alignment = w.alignment.unwrap_or(0);
        if alignment < 0
            || alignment as u64 > MAX_ALIGNMENT
            || (alignment != 0 && !(alignment as u64).is_power_of_two())
        {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `alignment` must be 0 (device default) or a power of two up to 1 GiB, got {alignment}"
            )));
        }
        Ok(AllocateRequest {
            device_id,
            size_bytes,
            allocation_type: w.allocation_type.unwrap_or(MemoryAllocationType::General),
            alignment: alignment as u64,
            purpose: w.purpose.unwrap_or_default(),
            persistent: w.persistent.unwrap_or(false),
            timeout_seconds: check_timeout(w.timeout_seconds, 30.0)?,
            holder: crate::domain::Caller::anonymous(),
        })
    }
}

impl ActionSpec for Allocate {
    const NAME: &'static str = "memory.allocate";
    const ROUTE: Route = Route::post("/v1/allocations", "Allocate memory (may wait for room)");
    type Request = AllocateRequest;
    type Response = AllocateMemoryResponse;

    fn data_schema(g: &mut SchemaGenerator) -> Option<Schema> {
        Some(g.subschema_for::<AllocateWire>())
    }

    fn parse(data: Option<&RawValue>) -> Result<AllocateRequest, ProtocolError> {
        AllocateRequest::parse(data)
    }

    fn handle(cx: &Context<'_>, mut req: AllocateRequest) -> Reply<AllocateMemoryResponse> {
        req.holder = cx.caller();
        let s = cx.service();
        let started = cx.started();
        let (req, large) = match s.try_allocate(req, started) {
            TryAllocate::Ready(r) => return Reply::Now(r),
            TryAllocate::Large(req) => (req, true),
            TryAllocate::MustWait(req) => (req, false),
        };
        // It waits for room, or (large) is placed off this thread first.
        let ticket = match cx.admit() {
            Ok(t) => t,
            Err(e) => {
                s.record_refused(&req);
                return Reply::Now(Err(e));
            }
        };
        let service = Arc::clone(s);
        Reply::later(async move {
            let _ticket = ticket;
            let req = if large {
                let blocking = Arc::clone(&service);
                let attempt =
                    tokio::task::spawn_blocking(move || blocking.allocate_large(req, started))
                        .await;
                match attempt {
                    Ok(TryAllocate::Ready(r)) => return r,
                    Ok(TryAllocate::MustWait(req) | TryAllocate::Large(req)) => req,
                    Err(_) => return Err(internal_error()),
                }
            } else {
                req
            };
            service.wait_and_allocate(req, started).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse::tests::raw;
    use crate::protocol::ErrorCode;

    fn allocate(text: &str) -> Result<AllocateRequest, ProtocolError> {
        AllocateRequest::parse(Some(&raw(text)))
    }

    #[test]
    fn allocate_defaults() {
        let r = allocate(r#"{"device_id":"cpu","size_bytes":4096,"purpose":null}"#).unwrap();
        assert_eq!(r.allocation_type, MemoryAllocationType::General);
        assert_eq!(r.alignment, 0);
        assert_eq!(r.purpose, "");
        assert!(!r.persistent);
        assert_eq!(r.timeout_seconds, 30.0);
    }

    #[test]
    fn sizes_must_be_positive_integers() {
        for bad in [
            "-5",
            "0",
            "1.5",
            "\"4096\"",
            "1e3",
            "true",
            "99999999999999999999",
        ] {
            let e = allocate(&format!(r#"{{"device_id":"cpu","size_bytes":{bad}}}"#)).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidParameter, "{bad}");
            assert!(e.message.contains("size_bytes"), "{bad}: {}", e.message);
        }
        let e = allocate(r#"{"device_id":"cpu"}"#).unwrap_err();
        assert!(e.message.contains("size_bytes"));
    }

    #[test]
    fn alignment_is_zero_or_a_power_of_two() {
        for good in [0, 1, 64, 4096, 1 << 30] {
            let r = allocate(&format!(
                r#"{{"device_id":"cpu","size_bytes":1,"alignment":{good}}}"#
            ));
            assert!(r.is_ok(), "{good}");
        }
        for bad in [3, 100, -64, 1 << 31] {
            let e = allocate(&format!(
                r#"{{"device_id":"cpu","size_bytes":1,"alignment":{bad}}}"#
            ))
            .unwrap_err();
            assert!(e.message.contains("alignment"), "{bad}");
        }
    }

    #[test]
    fn enum_fields_take_names_and_integers() {
        let r =
            allocate(r#"{"device_id":"cpu","size_bytes":1,"allocation_type":"cACHE"}"#).unwrap();
        assert_eq!(r.allocation_type, MemoryAllocationType::Cache);
        let r = allocate(r#"{"device_id":"cpu","size_bytes":1,"allocation_type":6}"#).unwrap();
        assert_eq!(r.allocation_type, MemoryAllocationType::Reservation);
        let e = allocate(r#"{"device_id":"cpu","size_bytes":1,"allocation_type":9}"#).unwrap_err();
        assert!(e.message.contains("allocation_type"));
    }

    #[test]
    fn timeout_range() {
        assert!(allocate(r#"{"device_id":"cpu","size_bytes":1,"timeout_seconds":0.5}"#).is_ok());
        assert!(allocate(r#"{"device_id":"cpu","size_bytes":1,"timeout_seconds":3601}"#).is_err());
        assert!(allocate(r#"{"device_id":"cpu","size_bytes":1,"timeout_seconds":-1}"#).is_err());
    }

    #[test]
    fn a_parsed_request_written_back_parses_the_same() {
        let r = allocate(
            r#"{"device_id":"cpu","size_bytes":7,"allocation_type":2,"alignment":64,"purpose":"p","persistent":true,"timeout_seconds":1.5}"#,
        )
        .unwrap();
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(allocate(&text).unwrap(), r);
    }
}
