//! What every action's request parsing shares (the contract's section 4, docs/protocol.md): reading
//! `data`, the checks of required, non-empty, size and timeout fields, and the contract's limits.
//!
//! Every field is read as optional (an optional field sent as `null` counts as missing), then
//! checked: a field missing, of the wrong type or out of range is `INVALID_PARAMETER` with a
//! message that names it. Unknown fields are ignored.

use crate::protocol::ProtocolError;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

/// The most bytes one `alignment` may ask for.
pub const MAX_ALIGNMENT: u64 = 1 << 30;
/// The longest `timeout_seconds`.
pub const MAX_TIMEOUT_SECONDS: f64 = 3600.0;
/// The longest lease time limit (`ttl_seconds`): 30 days.
pub const MAX_TTL_SECONDS: f64 = 30.0 * 24.0 * 3600.0;
/// The largest page `memory.get_allocations` returns.
pub const MAX_PAGE: u64 = 100_000;

/// Parses a request's `data` (absent or `null` = `{}`) into `T`, naming the field at fault.
pub fn parse_data<T: DeserializeOwned>(data: Option<&RawValue>) -> Result<T, ProtocolError> {
    let text = data.map(RawValue::get).unwrap_or("{}");
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends " at line 1 column N"; people want the field, not the column.
        let text = inner.to_string();
        let text = text.split(" at line ").next().unwrap_or(&text).to_string();
        if path == "." || path.is_empty() {
            ProtocolError::invalid_parameter(text)
        } else {
            ProtocolError::invalid_parameter(format!("field `{path}`: {text}"))
        }
    })
}

/// A required field's value, or the error that names it.
pub fn required<T>(value: Option<T>, field: &str) -> Result<T, ProtocolError> {
    value.ok_or_else(|| ProtocolError::invalid_parameter(format!("field `{field}` is required")))
}

/// A required string field that must not be empty.
pub fn non_empty(value: Option<String>, field: &str) -> Result<String, ProtocolError> {
    let v = required(value, field)?;
    if v.is_empty() {
        return Err(ProtocolError::invalid_parameter(format!(
            "field `{field}` must not be empty"
        )));
    }
    Ok(v)
}

/// Checks a size field: an integer number of bytes, at least 1.
pub fn check_size(value: i64, field: &str) -> Result<u64, ProtocolError> {
    if value < 1 {
        return Err(ProtocolError::invalid_parameter(format!(
            "field `{field}` must be an integer number of bytes ≥ 1, got {value}"
        )));
    }
    Ok(value as u64)
}

/// Checks `timeout_seconds` (0 to [`MAX_TIMEOUT_SECONDS`]), `default` when absent.
pub fn check_timeout(value: Option<f64>, default: f64) -> Result<f64, ProtocolError> {
    let v = value.unwrap_or(default);
    if !(0.0..=MAX_TIMEOUT_SECONDS).contains(&v) {
        return Err(ProtocolError::invalid_parameter(format!(
            "field `timeout_seconds` must be a number from 0 to 3600, got {v}"
        )));
    }
    Ok(v)
}

/// Checks an optional `ttl_seconds` (a lease's time limit): more than 0, at most
/// [`MAX_TTL_SECONDS`] (30 days).
pub fn check_ttl(value: Option<f64>) -> Result<Option<f64>, ProtocolError> {
    match value {
        None => Ok(None),
        Some(v) if v.is_finite() && v > 0.0 && v <= MAX_TTL_SECONDS => Ok(Some(v)),
        Some(v) => Err(ProtocolError::invalid_parameter(format!(
            "field `ttl_seconds` must be a number of seconds more than 0 and at most 2592000 \
             (30 days), got {v}; leave it out (or null) for no time limit"
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::value::RawValue;

    /// `text` as a request's `data`.
    pub(crate) fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }
}
