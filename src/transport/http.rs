//! HTTP: the metrics endpoint (`/metrics`, `/healthz`) that `memcoord worker --metrics-addr`
//! serves beside the stdio protocol.

use crate::service::MemoryService;
use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;

/// `/metrics`: OpenMetrics when the scraper asks for it (Prometheus does), else Prometheus'
/// text format 0.0.4.
async fn metrics(
    State(service): State<Arc<MemoryService>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let text = crate::metrics::render(service.telemetry());
    let openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        ([(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text)
    } else {
        (
            [(CONTENT_TYPE, crate::metrics::PROMETHEUS_CONTENT_TYPE)],
            crate::metrics::to_prometheus_text(&text),
        )
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// The routes of the metrics endpoint.
pub fn metrics_router(service: Arc<MemoryService>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(service)
}

/// Binds `addr` now (so a bad address is reported at start) and serves the metrics endpoint on
/// `runtime` until the process ends. Returns the bound address (useful with port 0).
pub fn start_metrics_server(
    addr: &str,
    service: Arc<MemoryService>,
    runtime: &tokio::runtime::Runtime,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let _guard = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(listener)?;
    runtime.spawn(async move {
        if let Err(e) = axum::serve(listener, metrics_router(service)).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    Ok(local)
}
