//! HTTP: `memcoord serve` (the protocol over HTTP: `POST /v1/command`, one REST route per
//! action, the dashboard, `/metrics`, `/healthz`, `/v1/openapi.json`) and the metrics endpoint
//! that `memcoord worker --metrics-addr` serves beside stdio.
//!
//! A REST route builds its action's typed request directly: `data` from the JSON body, the
//! query string (each field read as the type the request gives it, `api::query`) and the path;
//! `request_id` from `X-Request-Id` or a new UUID. The typed answer goes back in the
//! protocol's response envelope with HTTP status = the error's status (200 on success).
//! Those routes are in `http/rest.rs`; this file holds the server's state, the other routes and the
//! listener.

mod rest;

pub use super::server::{Timeouts, serve_on};
use crate::api::{Action, Response as Answer, internal_error};
pub use crate::api::{REST_ROUTES, RestRoute};
use crate::dispatch::{Dispatcher, InFlightLimit};
use crate::protocol::envelope::write_error;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::service::MemoryService;
use crate::transport::lines::write_answer;
use axum::Extension;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request as HttpRequest, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rest::{command, rest, rest_route};
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
        let mut map = self
            .by_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
            dispatcher: Dispatcher::new(service).with_defaults(crate::api::TransportDefaults::HTTP),
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

type Shared = Arc<HttpState>;

/// The remote address of a request, when the server was started with connect info.
type Client = Option<Extension<ConnectInfo<SocketAddr>>>;

fn client_address(client: Client) -> Option<IpAddr> {
    client.map(|Extension(ConnectInfo(a))| a.ip())
}

/// A JSON answer with HTTP status `status`, echoing `request_id` in `X-Request-Id`.
fn json_response(status: u16, body: Vec<u8>, request_id: Option<&str>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, [(CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    response
}

/// The envelope of a typed answer (`request_id` in it), with HTTP status = its status;
/// `header_id` is echoed in `X-Request-Id`.
fn answer_response(
    request_id: Option<&str>,
    header_id: Option<&str>,
    answer: &Result<Answer, ProtocolError>,
) -> Response {
    let mut out = Vec::with_capacity(512);
    write_answer(&mut out, request_id, answer);
    let status = match answer {
        Ok(_) => 200,
        Err(e) => e.code.status(),
    };
    json_response(status, out, header_id)
}

fn error_response(
    request_id: Option<&str>,
    code: ErrorCode,
    message: impl Into<String>,
) -> Response {
    let error = ProtocolError::new(code, message);
    let mut out = Vec::with_capacity(256);
    write_error(&mut out, request_id, &error);
    json_response(error.code.status(), out, request_id)
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
            Arc::new(Auth {
                operator: Some(Arc::<str>::from(token)),
                tenants: Arc::default(),
            }),
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
            json_response(200, out, Some(&rid))
        }
        Err(_) => {
            let error = internal_error();
            let mut out = Vec::new();
            write_error(&mut out, Some(&rid), &error);
            json_response(error.code.status(), out, Some(&rid))
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

async fn unknown_route(headers: HeaderMap, request: HttpRequest) -> Response {
    let rid = request_id(&headers);
    error_response(
        Some(&rid),
        ErrorCode::UnknownAction,
        format!("no route {} {}", request.method(), request.uri().path()),
    )
}

async fn wrong_method(headers: HeaderMap, request: HttpRequest) -> Response {
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

/// Who may call: the operator's token (`--token-file`) and, with tenants declared, each
/// tenant's token, or no token at all (the tenant `default`).
pub(crate) struct Auth {
    operator: Option<Arc<str>>,
    tenants: Arc<crate::domain::Tenants>,
}

/// The bearer token of a request (`Authorization: Bearer …`, the scheme case-insensitive as
/// RFC 9110 says), if it carries one.
fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| v[7..].trim().to_string())
        })
}

/// The caller of an HTTP request, by its bearer token: the token's tenant (the operator's is
/// `admin`), `default` without one. None when no tenants are declared (every request is
/// `default`, as before tenants).
fn http_caller(service: &MemoryService, headers: &HeaderMap) -> Option<Arc<crate::domain::Caller>> {
    let tenants = service.tenants();
    if !tenants.declared() {
        return None;
    }
    let tenant = bearer(headers)
        .and_then(|t| tenants.by_token(&t))
        .unwrap_or_else(|| Arc::from(crate::domain::DEFAULT_TENANT));
    Some(tenants.caller(&tenant))
}

/// Bearer-token check, compared in constant time. The token is never logged.
async fn require_token(
    State(auth): State<Arc<Auth>>,
    request: HttpRequest,
    next: Next,
) -> Response {
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    // The dashboard page may also take the token as `/?token=...`: a browser cannot send a
    // header when it opens a page (the page then sends the header on its own requests).
    let from_query = (request.uri().path() == "/")
        .then(|| request.uri().query())
        .flatten()
        .and_then(query_token);
    let given = bearer(request.headers()).or(from_query);
    let ok = match &given {
        Some(given) => {
            use subtle::ConstantTimeEq;
            let operator = auth.operator.as_ref().is_some_and(|token| {
                given.len() == token.len() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
            });
            operator || auth.tenants.by_token(given).is_some()
        }
        // With tenants declared, a request without a token is the tenant `default`'s.
        None => auth.tenants.declared(),
    };
    if ok {
        next.run(request).await
    } else {
        let rid = request_id(request.headers());
        let message = if auth.tenants.declared() {
            "the bearer token is no tenant's: send `Authorization: Bearer <token>` with your \
             tenant's token (its token_file in the config file) or the operator's (--token-file)"
        } else {
            "a bearer token is required: send `Authorization: Bearer <token>` (the token of --token-file)"
        };
        error_response(Some(&rid), ErrorCode::Unauthorized, message)
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
    for action in Action::ALL {
        api = api.route(action.route().path, rest_route(*action));
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
                    Action::ModelUnload,
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
    // Without a token or tenants there is nothing to check: no layer on the request path.
    let tenants = Arc::clone(state.dispatcher.service().tenants());
    if state.token.is_some() || tenants.declared() {
        api = api.layer(axum::middleware::from_fn_with_state(
            Arc::new(Auth {
                operator: state.token.as_deref().map(Arc::<str>::from),
                tenants,
            }),
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
}
