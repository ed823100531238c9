//! The envelope of the stdio protocol (and of `POST /v1/command`): a request line becomes
//! `(request_id, action, data)`, the typed call is made through dispatch, and its answer is
//! written as a response line echoing the `request_id`.

use crate::api::{Action, Admit, Reply, Response};
use crate::dispatch::Dispatcher;
use crate::protocol::envelope::{parse_request, write_error, write_success};
use crate::protocol::{ErrorCode, ProtocolError};
use std::future::Future;
use std::pin::Pin;

/// A response line still to come (a request that waits). The transport runs it on the async
/// runtime.
pub struct PendingLine {
    /// The request's id.
    pub request_id: String,
    /// Produces the response line.
    pub response: Pin<Box<dyn Future<Output = Vec<u8>> + Send>>,
}

/// Appends the response line of `answer` to `out`.
pub fn write_answer(
    out: &mut Vec<u8>,
    request_id: Option<&str>,
    answer: &Result<Response, ProtocolError>,
) {
    match answer {
        Ok(data) => write_success(out, request_id, data),
        Err(e) => write_error(out, request_id, e),
    }
}

/// A request line read: its id, its action, its `data` (still to be parsed).
pub struct LineRequest<'a> {
    /// The caller's id, echoed in the answer.
    pub request_id: std::borrow::Cow<'a, str>,
    /// The action.
    pub action: Action,
    /// Its `data` (None: absent or `null`).
    pub data: Option<&'a serde_json::value::RawValue>,
}

/// Reads one request line (without its line ending). `Err`: what to answer, with the request
/// id when the line had a valid one.
pub fn read_line(
    line: &[u8],
) -> Result<LineRequest<'_>, (Option<std::borrow::Cow<'_, str>>, ProtocolError)> {
    let request = parse_request(line).map_err(|e| (e.request_id, e.error))?;
    let Some(action) = Action::from_name(&request.action) else {
        let e = ProtocolError::new(
            ErrorCode::UnknownAction,
            format!("unknown action `{}`", request.action),
        );
        return Err((Some(request.request_id), e));
    };
    Ok(LineRequest {
        request_id: request.request_id,
        action,
        data: request.data,
    })
}

/// Handles one request line (without its line ending): appends its response line to `out`,
/// or returns it as a [`PendingLine`] when it has to wait. `admit`: the session's bound on
/// requests in flight (None: no bound).
pub fn handle_line(
    dispatcher: &Dispatcher,
    line: &[u8],
    out: &mut Vec<u8>,
    admit: Option<Admit<'_>>,
) -> Option<PendingLine> {
    let request = match read_line(line) {
        Ok(r) => r,
        Err((id, e)) => {
            write_error(out, id.as_deref(), &e);
            return None;
        }
    };
    let id: &str = &request.request_id;
    match dispatcher.call_action(request.action, request.data, admit) {
        Reply::Now(answer) => {
            write_answer(out, Some(id), &answer);
            None
        }
        Reply::Later(answer) => {
            let request_id = id.to_string();
            let rid = request_id.clone();
            Some(PendingLine {
                request_id,
                response: Box::pin(async move {
                    let answer = answer.await;
                    let mut out = Vec::with_capacity(512);
                    write_answer(&mut out, Some(&rid), &answer);
                    out
                }),
            })
        }
    }
}

/// The INTERNAL_ERROR response line of a request whose handling was lost (its task was
/// cancelled or panicked).
pub fn internal_error_line(out: &mut Vec<u8>, request_id: Option<&str>) {
    write_error(out, request_id, &crate::api::internal_error());
}
