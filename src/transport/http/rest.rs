//! The protocol's routes of `memcoord serve`: `POST /v1/command` (the stdio envelope) and one
//! REST route per action, whose typed request is built from the path, the query string and the
//! JSON body; requests that wait run on their own task, undone if the client leaves first.

use super::{
    Client, HttpState, Shared, answer_response, client_address, error_response, http_caller,
    request_id,
};
use crate::api::{Action, Admit, Reply, Request, Response as Answer, internal_error, query};
use crate::dispatch::Dispatcher;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::transport::lines::{read_line, write_answer};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::response::Response;
use axum::routing::{MethodRouter, on};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// A request still running for a client that may go away. The work runs on its own task, so
/// it is never cut in half; if the client disconnects first (the handler is dropped), what it
/// made for that client is undone when it finishes: an allocation is freed, a loaded model
/// unloaded, a lease released. A transfer simply completes.
struct UndoIfGone {
    dispatcher: Dispatcher,
    started: SystemTime,
    task: Option<tokio::task::JoinHandle<Result<Answer, ProtocolError>>>,
}

impl Drop for UndoIfGone {
    fn drop(&mut self) {
        let (Some(task), Ok(rt)) = (self.task.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let dispatcher = self.dispatcher.clone();
        let started = self.started;
        rt.spawn(async move {
            if let Ok(Ok(answer)) = task.await {
                undo(&dispatcher, &answer, started).await;
            }
        });
    }
}

/// The request that takes back what `answer` made, for a client that left; None when there is
/// nothing to take back.
fn undo_request(answer: &Answer, started: SystemTime) -> Option<Request> {
    Some(match answer {
        Answer::Allocate(a) => Request::Deallocate(crate::api::DeallocateRequest {
            allocation_id: a.allocation.allocation_id.clone(),
            device_id: None,
        }),
        // Only a load this request made (a model already loaded is answered as it is), and
        // never one somebody leased in the meantime (no force).
        Answer::ModelLoad(model) => {
            if model.loaded_at.0 + Duration::from_millis(1) < started {
                return None;
            }
            Request::ModelUnload(crate::api::ModelRequest {
                model_name: model.model_name.clone(),
                force: false,
                timeout_seconds: 30.0,
            })
        }
        Answer::ModelAcquire(lease) => Request::ModelRelease(crate::api::LeaseRequest {
            lease_id: lease.lease_id.clone(),
        }),
        _ => return None,
    })
}

/// Takes back what `answer` made for a client that left (see [`UndoIfGone`]).
async fn undo(dispatcher: &Dispatcher, answer: &Answer, started: SystemTime) {
    let Some(request) = undo_request(answer, started) else {
        return;
    };
    let undone = request.action().name();
    let result = match dispatcher.call(request, None) {
        Reply::Now(r) => r,
        Reply::Later(r) => r.await,
    };
    let mut out = Vec::new();
    write_answer(&mut out, Some("undo"), &result);
    tracing::info!(
        "client went away before the answer to {}: undone with {undone}: {}",
        answer.action().name(),
        String::from_utf8_lossy(&out).trim()
    );
}

/// Carries out a request of the client at `address` (`call` makes the typed call, given the
/// client's bound); waits for it if it has to (see [`UndoIfGone`]).
async fn dispatch(
    state: &HttpState,
    address: Option<IpAddr>,
    headers: &HeaderMap,
    call: impl FnOnce(&Dispatcher, Admit<'_>) -> Reply<Answer>,
) -> Result<Answer, ProtocolError> {
    // With tenants declared, the request is its bearer token's tenant's.
    let dispatcher = match http_caller(state.dispatcher.service(), headers) {
        Some(caller) => state.dispatcher.with_caller(caller),
        None => state.dispatcher.clone(),
    };
    let reply = {
        // The client's bound is looked up only for a request that takes a place.
        let admit = || state.clients.of(address).admit();
        call(&dispatcher, &admit)
    };
    let answer = match reply {
        Reply::Now(answer) => return answer,
        Reply::Later(answer) => answer,
    };
    let mut guard = UndoIfGone {
        dispatcher,
        started: SystemTime::now(),
        task: Some(tokio::spawn(answer)),
    };
    let result = match guard.task.as_mut() {
        Some(task) => task.await,
        None => return Err(internal_error()),
    };
    guard.task = None;
    result.unwrap_or_else(|_| Err(internal_error()))
}

/// An error answer after which the connection is closed (the rest of the body is not read).
fn closing_error_response(request_id: Option<&str>, code: ErrorCode, message: String) -> Response {
    let mut r = error_response(request_id, code, message);
    r.headers_mut().insert(
        axum::http::header::CONNECTION,
        HeaderValue::from_static("close"),
    );
    r
}

/// Reads a body up to the limit, within the body timeout. `Err` is the answer: REQUEST_TOO_LARGE
/// for a body over the limit (at once when its Content-Length says so, before any of it is
/// read), INVALID_REQUEST for one that did not arrive in time.
async fn read_body(
    state: &HttpState,
    body: Body,
    request_id: Option<&str>,
) -> Result<Bytes, Response> {
    use hyper::body::Body as _;
    let too_large = || {
        closing_error_response(
            request_id,
            ErrorCode::RequestTooLarge,
            format!("request body over the limit of {} bytes", state.body_limit),
        )
    };
    if body.size_hint().lower() > state.body_limit as u64 {
        return Err(too_large());
    }
    match tokio::time::timeout(
        state.body_timeout,
        axum::body::to_bytes(body, state.body_limit),
    )
    .await
    {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(too_large()),
        Err(_) => Err(closing_error_response(
            request_id,
            ErrorCode::InvalidRequest,
            format!(
                "the request body did not arrive within {} (the body read timeout)",
                humantime::format_duration(state.body_timeout)
            ),
        )),
    }
}

pub(super) async fn command(
    State(state): State<Shared>,
    client: Client,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&state, body, None).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let request = match read_line(&body) {
        Ok(r) => r,
        Err((id, e)) => return answer_response(id.as_deref(), None, &Err(e)),
    };
    let answer = dispatch(&state, client_address(client), &headers, |d, admit| {
        d.call_action(request.action, request.data, Some(admit))
    })
    .await;
    answer_response(Some(&request.request_id), None, &answer)
}

/// A REST request's `data`: the JSON body's object, then the query string's fields (each as
/// the type `action`'s request gives it), then the path's parameters.
fn rest_data(
    action: Action,
    body: &[u8],
    path: HashMap<String, String>,
    query: Vec<(String, String)>,
) -> Result<Map<String, Value>, ProtocolError> {
    let mut data = Map::new();
    if !body.iter().all(u8::is_ascii_whitespace) {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => data = m,
            Ok(_) => {
                return Err(ProtocolError::invalid_request(
                    "the body must be a JSON object (the request's `data`)",
                ));
            }
            Err(e) => {
                return Err(ProtocolError::invalid_request(format!(
                    "the body is not JSON: {e}"
                )));
            }
        }
    }
    for (k, v) in query {
        let value = query::value(action, &k, &v);
        data.insert(k, value);
    }
    for (k, v) in path {
        data.insert(k, Value::String(v));
    }
    Ok(data)
}

pub(super) async fn rest(
    state: Shared,
    address: Option<IpAddr>,
    action: Action,
    path: HashMap<String, String>,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let rid = request_id(&headers);
    let body = match read_body(&state, body, Some(&rid)).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let data = rest_data(action, &body, path, query)
        .and_then(|data| serde_json::value::to_raw_value(&data).map_err(|_| internal_error()));
    let data = match data {
        Ok(d) => d,
        Err(e) => return answer_response(Some(&rid), Some(&rid), &Err(e)),
    };
    let answer = dispatch(&state, address, &headers, |d, admit| {
        d.call_action(action, Some(&data), Some(admit))
    })
    .await;
    answer_response(Some(&rid), Some(&rid), &answer)
}

pub(super) fn rest_route(action: Action) -> MethodRouter<Shared> {
    let method = Method::from_bytes(action.route().method.as_bytes()).unwrap_or(Method::GET);
    let handler = move |State(state): State<Shared>,
                        client: Client,
                        path: Option<Path<HashMap<String, String>>>,
                        Query(query): Query<Vec<(String, String)>>,
                        headers: HeaderMap,
                        body: Body| async move {
        let path = path.map(|Path(p)| p).unwrap_or_default();
        let address = client_address(client);
        rest(state, address, action, path, query, headers, body).await
    };
    on(
        axum::routing::MethodFilter::try_from(method).unwrap_or(axum::routing::MethodFilter::GET),
        handler,
    )
}
