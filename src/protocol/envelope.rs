//! The request and response envelope (the contract's section 2, docs/protocol.md), parsed without copying.

use super::error::{ErrorCode, ProtocolError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The longest `request_id` accepted, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// A request envelope borrowed from its line: `action` and `data` are checked and parsed by
/// dispatch, which knows what each action needs.
#[derive(Debug)]
pub struct Request<'a> {
    /// The caller's id, echoed in the response.
    pub request_id: Cow<'a, str>,
    /// The action name.
    pub action: Cow<'a, str>,
    /// The action's data: `None` when absent or `null`; always a JSON object otherwise.
    pub data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow)]
    request_id: Option<&'a RawValue>,
    #[serde(borrow)]
    action: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Why a line could not become a [`Request`]: the error, and the request id if one could be read.
#[derive(Debug)]
pub struct EnvelopeError<'a> {
    /// The id to echo, if the line had a valid one.
    pub request_id: Option<Cow<'a, str>>,
    /// What was wrong.
    pub error: ProtocolError,
}

fn read_string<'a>(raw: &'a RawValue) -> Option<Cow<'a, str>> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    if !text.contains('\\') {
        return Some(Cow::Borrowed(&text[1..text.len() - 1]));
    }
    serde_json::from_str::<String>(text).ok().map(Cow::Owned)
}

/// Parses one line (without its line ending) into a request envelope.
pub fn parse_request(line: &[u8]) -> Result<Request<'_>, EnvelopeError<'_>> {
    let fail = |message: String| EnvelopeError {
        request_id: None,
        error: ProtocolError::invalid_request(message),
    };
    let first = line.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(match std::str::from_utf8(line) {
            Ok(text) if serde_json::from_str::<&RawValue>(text).is_ok() => {
                fail("the request must be a JSON object".to_string())
            }
            Ok(_) => fail("the line is not valid JSON".to_string()),
            Err(_) => fail("the line is not valid UTF-8".to_string()),
        });
    }
    let text =
        std::str::from_utf8(line).map_err(|_| fail("the line is not valid UTF-8".to_string()))?;
    let raw: RawEnvelope<'_> = serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        if e.is_data() {
            // Valid JSON with a structural problem, e.g. a duplicated field.
            fail(format!("invalid request envelope: {msg}"))
        } else {
            fail(format!("the line is not valid JSON: {msg}"))
        }
    })?;

    let request_id = match raw.request_id.and_then(read_string) {
        Some(id) if !id.is_empty() && id.len() <= MAX_REQUEST_ID_BYTES => id,
        _ => {
            return Err(fail(format!(
                "`request_id` must be a non-empty string of at most {MAX_REQUEST_ID_BYTES} bytes"
            )));
        }
    };
    let with_id = |message: &str| EnvelopeError {
        request_id: Some(request_id.clone()),
        error: ProtocolError::invalid_request(message),
    };
    let action = match raw.action {
        None => return Err(with_id("`action` is required")),
        Some(a) if a.get() == "null" => return Err(with_id("`action` is required")),
        Some(a) => match read_string(a) {
            Some(action) => action,
            None => return Err(with_id("`action` must be a string")),
        },
    };
    let data = match raw.data {
        None => None,
        Some(d) if d.get() == "null" => None,
        Some(d) if d.get().starts_with('{') => Some(d),
        Some(_) => return Err(with_id("`data` must be an object (or null)")),
    };
    Ok(Request {
        request_id,
        action,
        data,
    })
}

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    success: bool,
    request_id: Option<&'a str>,
    data: Option<&'a T>,
    error_code: Option<&'static str>,
    error_message: Option<&'a str>,
    status_code: u16,
}

/// Appends a success response and its line ending to `out`.
pub fn write_success<T: Serialize>(out: &mut Vec<u8>, request_id: Option<&str>, data: &T) {
    let env = Envelope {
        success: true,
        request_id,
        data: Some(data),
        error_code: None,
        error_message: None,
        status_code: 200,
    };
    write_envelope(out, &env);
}

/// Appends an error response and its line ending to `out`.
pub fn write_error(out: &mut Vec<u8>, request_id: Option<&str>, error: &ProtocolError) {
    let env: Envelope<'_, ()> = Envelope {
        success: false,
        request_id,
        data: None,
        error_code: Some(error.code.as_str()),
        error_message: Some(&error.message),
        status_code: error.code.status(),
    };
    write_envelope(out, &env);
}

fn write_envelope<T: Serialize>(out: &mut Vec<u8>, env: &Envelope<'_, T>) {
    let start = out.len();
    if serde_json::to_writer(&mut *out, env).is_err() {
        // Serialising plain data into a Vec cannot fail; if it ever does, say so instead of
        // sending half a line.
        out.truncate(start);
        let fallback = ProtocolError::new(
            ErrorCode::InternalError,
            "internal error: the response could not be serialised (this is a bug)",
        );
        let env: Envelope<'_, ()> = Envelope {
            success: false,
            request_id: env.request_id,
            data: None,
            error_code: Some(fallback.code.as_str()),
            error_message: Some(&fallback.message),
            status_code: fallback.code.status(),
        };
        let _ = serde_json::to_writer(&mut *out, &env);
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: &str) -> (Option<String>, ErrorCode) {
        let e = parse_request(line.as_bytes()).unwrap_err();
        (e.request_id.map(std::borrow::Cow::into_owned), e.error.code)
    }

    #[test]
    fn parses_a_request() {
        let r = parse_request(br#"{"request_id":"a\"b","action":"memory.get_usage","data":{"device_id":"cpu"},"extra":1}"#)
            .unwrap();
        assert_eq!(r.request_id, "a\"b");
        assert_eq!(r.action, "memory.get_usage");
        assert_eq!(r.data.unwrap().get(), r#"{"device_id":"cpu"}"#);
    }

    #[test]
    fn rejects_bad_envelopes() {
        assert_eq!(err("not json"), (None, ErrorCode::InvalidRequest));
        assert_eq!(err("[1,2]"), (None, ErrorCode::InvalidRequest));
        assert_eq!(err("\"x\""), (None, ErrorCode::InvalidRequest));
        assert_eq!(err("{\"action\":\"a\"}"), (None, ErrorCode::InvalidRequest));
        assert_eq!(
            err("{\"request_id\":5,\"action\":\"a\"}"),
            (None, ErrorCode::InvalidRequest)
        );
        assert_eq!(
            err("{\"request_id\":\"\",\"action\":\"a\"}"),
            (None, ErrorCode::InvalidRequest)
        );
        let long = format!(
            "{{\"request_id\":\"{}\",\"action\":\"a\"}}",
            "x".repeat(257)
        );
        assert_eq!(err(&long), (None, ErrorCode::InvalidRequest));
        assert_eq!(
            err("{\"request_id\":\"r\"}"),
            (Some("r".into()), ErrorCode::InvalidRequest)
        );
        assert_eq!(
            err("{\"request_id\":\"r\",\"action\":1}"),
            (Some("r".into()), ErrorCode::InvalidRequest)
        );
        assert_eq!(
            err("{\"request_id\":\"r\",\"action\":\"a\",\"data\":[1]}"),
            (Some("r".into()), ErrorCode::InvalidRequest)
        );
        assert_eq!(
            err("{\"request_id\":\"r\",\"action\":\"a\""),
            (None, ErrorCode::InvalidRequest)
        );
    }

    #[test]
    fn null_data_is_absent() {
        let r = parse_request(br#"{"request_id":"r","action":"a","data":null}"#).unwrap();
        assert!(r.data.is_none());
    }

    #[test]
    fn writes_full_envelopes() {
        let mut out = Vec::new();
        write_error(&mut out, None, &ProtocolError::invalid_request("bad"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"success\":false,\"request_id\":null,\"data\":null,\"error_code\":\"INVALID_REQUEST\",\"error_message\":\"bad\",\"status_code\":400}\n"
        );
    }
}
