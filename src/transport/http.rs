//! HTTP: `memcoord serve` (the protocol over HTTP: `POST /v1/command`, one REST route per
//! action, the dashboard, `/metrics`, `/healthz`, `/v1/openapi.json`) and the metrics endpoint
//! that `memcoord worker --metrics-addr` serves beside stdio.
//!
//! Every protocol answer goes through the same dispatcher as stdio: a REST route only builds
//! the request envelope (action from the route, `data` from the path, the query string and the
//! JSON body; `request_id` from `X-Request-Id` or a new UUID) and sends the answer's envelope
//! back with HTTP status = `status_code`.

pub use super::routes::{REST_ROUTES, RestRoute};
pub use super::server::{Timeouts, serve_on};
use crate::dispatch::{Dispatcher, InFlightLimit, internal_error};
use crate::protocol::envelope::write_error;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::service::MemoryService;
use axum::Extension;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, on};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The address `memcoord serve` listens on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7077";
/// The largest request body accepted by default (as stdio's line limit).
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;
/// The header a REST request's `request_id` comes from (and is echoed in).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The header read (and keep-alive idle) timeout by default.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The body read timeout by default.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Query-string fields read as booleans (`true`/`false`, `1`/`0`).
const BOOL_FIELDS: &[&str] = &[
    "include_allocations",
    "include_usage_stats",
    "include_fragmentation",
    "force",
    "persistent",
    "wait_for_completion",
];
/// Query-string fields read as numbers.
const NUMBER_FIELDS: &[&str] = &[
    "offset",
    "limit",
    "size_bytes",
    "alignment",
    "timeout_seconds",
    "window_seconds",
    "idle_seconds",
    "target_bytes",
    "target_usage_percentage",
    "keep_alive_seconds",
];

/// Query-string enum fields: a name stays a string, an integer is read as the enum's value.
const ENUM_FIELDS: &[&str] = &["allocation_type", "optimization_type"];

/// A query-string value as the JSON type of the field it fills. A value that is not of that
/// type stays a string, so the request is refused with INVALID_PARAMETER naming the field.
fn query_value(field: &str, raw: &str) -> Value {
    if BOOL_FIELDS.contains(&field) {
        match raw {
            "true" | "1" => return Value::Bool(true),
            "false" | "0" => return Value::Bool(false),
            _ => {}
        }
    } else if (NUMBER_FIELDS.contains(&field) || ENUM_FIELDS.contains(&field))
        && let Ok(n) = serde_json::from_str::<serde_json::Number>(raw)
    {
        return Value::Number(n);
    }
    Value::String(raw.to_string())
}

/// The bound on requests in flight of each HTTP client, a client being a remote address
/// (every local process shares the loopback address). See [`InFlightLimit`].
struct ClientLimits {
    max: usize,
    by_address: Mutex<HashMap<IpAddr, Arc<InFlightLimit>>>,
}

/// Past this many client addresses, those with nothing in flight are forgotten.
const REMEMBERED_CLIENTS: usize = 4096;

impl ClientLimits {
    /// The limit of the client at `address` (unknown: one shared by every such client).
    fn of(&self, address: Option<IpAddr>) -> Arc<InFlightLimit> {
        let key = address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let mut map = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= REMEMBERED_CLIENTS && !map.contains_key(&key) {
            map.retain(|_, l| Arc::strong_count(l) > 1);
        }
        Arc::clone(
            map.entry(key)
                .or_insert_with(|| InFlightLimit::new(self.max)),
        )
    }
}

/// The shared state of the HTTP server.
pub struct HttpState {
    dispatcher: Dispatcher,
    token: Option<String>,
    body_limit: usize,
    body_timeout: Duration,
    clients: ClientLimits,
}

impl HttpState {
    /// State over a service; `token` (if any) is required on every route but `/healthz`. Each
    /// client may have [`DEFAULT_MAX_IN_FLIGHT`](crate::transport::stdio::DEFAULT_MAX_IN_FLIGHT)
    /// requests in flight.
    pub fn new(service: Arc<MemoryService>, token: Option<String>, body_limit: usize) -> Self {
        HttpState {
            dispatcher: Dispatcher::new(service),
            token,
            body_limit,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            clients: ClientLimits {
                max: crate::transport::stdio::DEFAULT_MAX_IN_FLIGHT,
                by_address: Mutex::new(HashMap::new()),
            },
        }
    }

    /// Sets the bound on requests in flight per client address.
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.clients.max = max;
        self
    }

    /// Sets how long a request's body may take to arrive.
    pub fn with_body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }
}

/// The remote address of a request, when the server was started with connect info.
type Client = Option<Extension<ConnectInfo<SocketAddr>>>;

fn client_address(client: Client) -> Option<IpAddr> {
    client.map(|Extension(ConnectInfo(a))| a.ip())
}

type Shared = Arc<HttpState>;

/// The `status_code` of an envelope line: the envelope writer puts it last, so it is read from
/// the end instead of parsing the whole answer again (which cost 4% of a small request).
fn status_code_of(line: &[u8]) -> Option<u16> {
    const KEY: &[u8] = b"\"status_code\":";
    let tail = &line[line.len().saturating_sub(32)..];
    let at = tail.windows(KEY.len()).rposition(|w| w == KEY)?;
    let digits: Vec<u8> = tail[at + KEY.len()..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// An envelope answer, with HTTP status = its `status_code`.
fn envelope_response(line: Vec<u8>, request_id: Option<&str>) -> Response {
    let status = status_code_of(&line)
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, [(CONTENT_TYPE, "application/json")], line).into_response();
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    response
}

fn error_response(
    request_id: Option<&str>,
    code: ErrorCode,
    message: impl Into<String>,
) -> Response {
    let mut out = Vec::with_capacity(256);
    write_error(&mut out, request_id, &ProtocolError::new(code, message));
    envelope_response(out, request_id)
}

/// The request's id: its `X-Request-Id` (a non-empty string of at most 256 bytes) or a new
/// UUID.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().hyphenated().to_string())
}

/// A request still running for a client that may go away. The work runs on its own task, so
/// it is never cut in half; if the client disconnects first (the handler is dropped), what it
/// made for that client is undone when it finishes: an allocation is freed, a loaded model
/// unloaded, a lease released. A transfer simply completes.
struct UndoIfGone {
    dispatcher: Dispatcher,
    line: Vec<u8>,
    started: std::time::SystemTime,
    task: Option<tokio::task::JoinHandle<Vec<u8>>>,
}

impl Drop for UndoIfGone {
    fn drop(&mut self) {
        let (Some(task), Ok(rt)) = (self.task.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let dispatcher = self.dispatcher.clone();
        let line = std::mem::take(&mut self.line);
        let started = self.started;
        rt.spawn(async move {
            if let Ok(answer) = task.await {
                undo(&dispatcher, &line, &answer, started).await;
            }
        });
    }
}

/// The request that takes back what `answer` (to `line`) made, run for a client that left.
async fn undo(dispatcher: &Dispatcher, line: &[u8], answer: &[u8], started: std::time::SystemTime) {
    #[derive(serde::Deserialize)]
    struct Req {
        action: String,
    }
    let (Ok(req), Ok(ans)) = (
        serde_json::from_slice::<Req>(line),
        serde_json::from_slice::<Value>(answer),
    ) else {
        return;
    };
    if ans["success"] != true {
        return;
    }
    let data = &ans["data"];
    let (action, undo_data) = match req.action.as_str() {
        "memory.allocate" => (
            "memory.deallocate",
            serde_json::json!({"allocation_id": data["allocation"]["allocation_id"]}),
        ),
        // Only a load this request made (a model already loaded is answered as it is), and
        // never one somebody leased in the meantime (no force).
        "memory.model_load" => {
            let loaded_now = data["loaded_at"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .is_some_and(|t| t + std::time::Duration::from_millis(1) >= started);
            if !loaded_now {
                return;
            }
            (
                "memory.model_unload",
                serde_json::json!({"model_name": data["model_name"], "force": false}),
            )
        }
        "memory.model_acquire" => (
            "memory.model_release",
            serde_json::json!({"lease_id": data["lease_id"]}),
        ),
        _ => return,
    };
    let line =
        serde_json::json!({"request_id": "undo", "action": action, "data": undo_data}).to_string();
    let mut out = Vec::new();
    if let Some(p) = dispatcher.handle_line(line.as_bytes(), &mut out) {
        out = p.response.await;
    }
    tracing::info!(
        "client went away before the answer to {}: undone with {action}: {}",
        req.action,
        String::from_utf8_lossy(&out).trim()
    );
}

/// Handles one envelope line of the client at `address`; waits for it if it has to (see
/// [`UndoIfGone`]).
async fn dispatch(state: &HttpState, line: &[u8], address: Option<IpAddr>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    // The client's bound is looked up only for a request that takes a place.
    let admit = || state.clients.of(address).admit();
    match state
        .dispatcher
        .handle_line_admitting(line, &mut out, &admit)
    {
        None => out,
        Some(pending) => {
            let id = pending.request_id.clone();
            let mut guard = UndoIfGone {
                dispatcher: state.dispatcher.clone(),
                line: line.to_vec(),
                started: std::time::SystemTime::now(),
                task: Some(tokio::spawn(pending.response)),
            };
            let result = match guard.task.as_mut() {
                Some(task) => task.await,
                None => return out,
            };
            guard.task = None;
            match result {
                Ok(line) => line,
                Err(_) => {
                    let mut out = Vec::with_capacity(256);
                    internal_error(&mut out, Some(&id));
                    out
                }
            }
        }
    }
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

async fn command(State(state): State<Shared>, client: Client, body: Body) -> Response {
    let body = match read_body(&state, body, None).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let line = dispatch(&state, &body, client_address(client)).await;
    envelope_response(line, None)
}

async fn rest(
    state: Shared,
    address: Option<IpAddr>,
    action: &'static str,
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
    let mut data = Map::new();
    if !body.iter().all(u8::is_ascii_whitespace) {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => data = m,
            Ok(_) => {
                return error_response(
                    Some(&rid),
                    ErrorCode::InvalidRequest,
                    "the body must be a JSON object (the request's `data`)",
                );
            }
            Err(e) => {
                return error_response(
                    Some(&rid),
                    ErrorCode::InvalidRequest,
                    format!("the body is not JSON: {e}"),
                );
            }
        }
    }
    for (k, v) in query {
        let value = query_value(&k, &v);
        data.insert(k, value);
    }
    for (k, v) in path {
        data.insert(k, Value::String(v));
    }
    let line = serde_json::json!({"request_id": rid, "action": action, "data": data}).to_string();
    let answer = dispatch(&state, line.as_bytes(), address).await;
    envelope_response(answer, Some(&rid))
}

fn rest_route(route: &'static RestRoute) -> MethodRouter<Shared> {
    let method = Method::from_bytes(route.method.as_bytes()).unwrap_or(Method::GET);
    let handler = move |State(state): State<Shared>,
                        client: Client,
                        path: Option<Path<HashMap<String, String>>>,
                        Query(query): Query<Vec<(String, String)>>,
                        headers: HeaderMap,
                        body: Body| async move {
        let path = path.map(|Path(p)| p).unwrap_or_default();
        let address = client_address(client);
        rest(state, address, route.action, path, query, headers, body).await
    };
    on(
        axum::routing::MethodFilter::try_from(method).unwrap_or(axum::routing::MethodFilter::GET),
        handler,
    )
}

/// `/metrics`: OpenMetrics when the scraper asks for it (Prometheus does), else Prometheus'
/// text format 0.0.4.
async fn metrics(State(service): State<Arc<MemoryService>>, headers: HeaderMap) -> Response {
    metrics_response(&service, &headers)
}

async fn serve_metrics(State(state): State<Shared>, headers: HeaderMap) -> Response {
    metrics_response(state.dispatcher.service(), &headers)
}

fn metrics_response(service: &MemoryService, headers: &HeaderMap) -> Response {
    let text = crate::metrics::render(service.telemetry());
    let openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        ([(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
    } else {
        (
            [(CONTENT_TYPE, crate::metrics::PROMETHEUS_CONTENT_TYPE)],
            crate::metrics::to_prometheus_text(&text),
        )
            .into_response()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// The routes of the metrics endpoint (`memcoord worker --metrics-addr`); with a token,
/// `/metrics` requires it.
pub fn metrics_router(service: Arc<MemoryService>, token: Option<String>) -> Router {
    let mut router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz));
    if let Some(token) = token {
        router = router.layer(axum::middleware::from_fn_with_state(
            Arc::<str>::from(token),
            require_token,
        ));
    }
    router.with_state(service)
}

async fn dashboard_page() -> Response {
    (
        [(CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../../assets/dashboard.html"),
    )
        .into_response()
}

async fn dashboard_state(
    State(state): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let rid = request_id(&headers);
    let buckets = query
        .get("buckets")
        .and_then(|b| b.parse::<usize>().ok())
        .unwrap_or(256)
        .clamp(1, 4096);
    let service = Arc::clone(state.dispatcher.service());
    match tokio::task::spawn_blocking(move || service.dashboard_state(buckets)).await {
        Ok(data) => {
            let mut out = Vec::with_capacity(64 << 10);
            crate::protocol::envelope::write_success(&mut out, Some(&rid), &data);
            envelope_response(out, Some(&rid))
        }
        Err(_) => {
            let mut out = Vec::new();
            internal_error(&mut out, Some(&rid));
            envelope_response(out, Some(&rid))
        }
    }
}

async fn openapi() -> Response {
    (
        [(CONTENT_TYPE, "application/json")],
        crate::transport::openapi::document().to_string(),
    )
        .into_response()
}

async fn unknown_route(headers: HeaderMap, request: Request) -> Response {
    let rid = request_id(&headers);
    error_response(
        Some(&rid),
        ErrorCode::UnknownAction,
        format!("no route {} {}", request.method(), request.uri().path()),
    )
}

async fn wrong_method(headers: HeaderMap, request: Request) -> Response {
    let rid = request_id(&headers);
    error_response(
        Some(&rid),
        ErrorCode::MethodNotAllowed,
        format!(
            "{} is not allowed on {} (see /v1/openapi.json)",
            request.method(),
            request.uri().path()
        ),
    )
}

/// The `token` of a query string (a page URL's), `%XX` and `+` decoded.
fn query_token(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// Bearer-token check, compared in constant time. The token is never logged.
async fn require_token(State(token): State<Arc<str>>, request: Request, next: Next) -> Response {
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    // The dashboard page may also take the token as `/?token=...`: a browser cannot send a
    // header when it opens a page (the page then sends the header on its own requests).
    let from_query = (request.uri().path() == "/")
        .then(|| request.uri().query())
        .flatten()
        .and_then(query_token);
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110).
        .and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| v[7..].trim().to_string())
        })
        .or(from_query)
        .unwrap_or_default();
    let ok = {
        use subtle::ConstantTimeEq;
        given.len() == token.len() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
    };
    if ok {
        next.run(request).await
    } else {
        let rid = request_id(request.headers());
        error_response(
            Some(&rid),
            ErrorCode::Unauthorized,
            "a bearer token is required: send `Authorization: Bearer <token>` (the token of --token-file)",
        )
    }
}

/// Every route of `memcoord serve`.
pub fn serve_router(state: Shared) -> Router {
    let mut api = Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/command", axum::routing::post(command))
        .route("/v1/dashboard/state", get(dashboard_state))
        .route("/v1/openapi.json", get(openapi))
        .route("/", get(dashboard_page));
    for route in REST_ROUTES {
        api = api.route(route.path, rest_route(route));
    }
    // The static `/v1/models/optimize` (POST) shadows `/v1/models/{model_name}` for a model
    // named "optimize": its unload is added to the static route.
    api = api.route(
        "/v1/models/optimize",
        axum::routing::delete(
            |State(state): State<Shared>,
             client: Client,
             Query(query): Query<Vec<(String, String)>>,
             headers: HeaderMap,
             body: Body| async move {
                let path = HashMap::from([("model_name".to_string(), "optimize".to_string())]);
                let address = client_address(client);
                rest(
                    state,
                    address,
                    "memory.model_unload",
                    path,
                    query,
                    headers,
                    body,
                )
                .await
            },
        ),
    );
    let mut api = api
        .route("/metrics", get(serve_metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method);
    // Without a token there is nothing to check: no layer on the request path.
    if let Some(token) = &state.token {
        api = api.layer(axum::middleware::from_fn_with_state(
            Arc::<str>::from(token.as_str()),
            require_token,
        ));
    }
    let api = api.with_state(Arc::clone(&state));
    api.layer(axum::extract::DefaultBodyLimit::disable())
}

/// Whether an address may be listened on without a token: loopback only.
pub fn needs_token(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

/// The one rule for every HTTP listener (`serve --listen`, `worker --metrics-addr`): off
/// loopback, a bearer token is required. `Err` says so, for people.
pub fn check_listen_address(addr: &SocketAddr, has_token: bool) -> Result<(), String> {
    if needs_token(addr) && !has_token {
        return Err(format!(
            "{addr} is not a loopback address: a bearer token is required to listen there \
             (--token-file FILE)"
        ));
    }
    Ok(())
}

/// [`check_listen_address`] of an `ADDR:PORT` as given, before anything is bound or created.
/// A host name (not an IP address) passes here and is checked once bound.
pub fn check_listen_text(addr: &str, has_token: bool) -> Result<(), String> {
    match addr.parse::<SocketAddr>() {
        Ok(a) => check_listen_address(&a, has_token),
        Err(_) => Ok(()),
    }
}

/// Reads a bearer token from `path` (surrounding whitespace trimmed); an empty one is refused.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(format!(
            "--token-file {}: the file is empty",
            path.display()
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_code_is_read_from_the_end() {
        let mut ok = Vec::new();
        crate::protocol::envelope::write_success(
            &mut ok,
            Some("x"),
            &serde_json::json!({"status_code": 999}),
        );
        assert_eq!(status_code_of(&ok), Some(200));
        let mut err = Vec::new();
        write_error(
            &mut err,
            None,
            &ProtocolError::new(ErrorCode::Unauthorized, "no"),
        );
        assert_eq!(status_code_of(&err), Some(401));
        assert_eq!(status_code_of(b"garbage"), None);
    }

    #[test]
    fn query_tokens_are_percent_decoded() {
        assert_eq!(
            query_token("x=1&token=a%2Bb+c%25%zz%").as_deref(),
            Some("a+b c%%zz%")
        );
        assert_eq!(
            query_token("token=%C3%BCmlaut%C3%BC").as_deref(),
            Some("ümlautü")
        );
        assert_eq!(query_token("tokens=1"), None);
    }

    #[test]
    fn query_values_take_their_fields_types() {
        assert_eq!(query_value("force", "true"), Value::Bool(true));
        assert_eq!(query_value("limit", "5"), serde_json::json!(5));
        assert_eq!(query_value("allocation_type", "2"), serde_json::json!(2));
        assert_eq!(
            query_value("allocation_type", "Cache"),
            serde_json::json!("Cache")
        );
        assert_eq!(query_value("purpose", "123"), serde_json::json!("123"));
    }
}
