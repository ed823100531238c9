//! The HTTP server loop: serves a router on a listener until a shutdown future completes.
//! It installs no signal handler and prints nothing: `main` binds, prints and triggers the
//! [`Shutdown`](crate::runtime::Shutdown) it hands in; tests serve on a port-0 listener the same
//! way.

use super::http::{
    DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, HttpState, check_listen_address,
    check_listen_text, metrics_router, serve_router,
};
use crate::service::MemoryService;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long the server waits for a client's bytes. A client that is slower, or sends nothing,
/// loses its connection instead of holding it (and a task) forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Reading a request's header, counted from when the server starts waiting for it: from
    /// the connection's start, or from the end of the previous answer on a keep-alive
    /// connection. So it is also how long an idle keep-alive connection stays open. Past it the
    /// connection is closed without an answer.
    pub header: Duration,
    /// Reading a request's body, from the end of its header. Past it the request is answered
    /// INVALID_REQUEST (400) and the connection closed.
    pub body: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: DEFAULT_HEADER_TIMEOUT,
            body: DEFAULT_BODY_TIMEOUT,
        }
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting, lets every
/// connection finish the request it is on, and returns when all are closed.
///
/// Why not `axum::serve`: it cannot bound how long a client takes over a request's header, so an
/// idle or half-sent connection held a task and a descriptor forever. This is its loop (HTTP/1.1,
/// the client's address as `ConnectInfo`) with hyper's header read timeout.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tokio::sync::watch;
    let (signal_tx, signal_rx) = watch::channel(());
    tokio::spawn(async move {
        shutdown.await;
        drop(signal_rx);
    });
    let (close_tx, close_rx) = watch::channel(());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of descriptors, say: wait for some to be closed.
                    tracing::error!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            _ = signal_tx.closed() => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(remote));
                let mut router = router.clone();
                async move {
                    let request = req.map(Body::new);
                    tower_service::Service::call(&mut router, request).await
                }
            });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let (signal_tx, close_rx) = (signal_tx.clone(), close_rx.clone());
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!("connection from {remote} ended: {e}");
                    }
                }
                _ = signal_tx.closed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                }
            }
            drop(close_rx);
        });
    }
    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
}

/// Binds `addr` now (so a bad address is reported at start) and serves the metrics endpoint on
/// `runtime` until `shutdown` completes. Returns the bound address (useful with port 0). Off
/// loopback a token is required ([`check_listen_address`]), and then `/metrics` requires it.
pub fn start_metrics_server(
    addr: &str,
    service: Arc<MemoryService>,
    token: Option<String>,
    timeouts: Timeouts,
    runtime: &tokio::runtime::Runtime,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<std::net::SocketAddr, String> {
    check_listen_text(addr, token.is_some())?;
    let listener = std::net::TcpListener::bind(addr).map_err(|e| e.to_string())?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    check_listen_address(&local, token.is_some())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let _guard = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
    let router = metrics_router(service, token);
    runtime.spawn(serve_on(listener, router, timeouts, shutdown));
    Ok(local)
}

/// How `memcoord serve` serves (the listener is bound by the caller).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The bearer token every route but `/healthz` requires; needed off loopback.
    pub token: Option<String>,
    /// The largest request body.
    pub body_limit: usize,
    /// The most requests one client address may have in flight.
    pub max_in_flight: usize,
    /// How long a client may take over a request's header and body.
    pub timeouts: Timeouts,
}

impl Default for ServeOptions {
    /// No token, a 1 MiB body limit, the default bound on requests in flight and timeouts.
    fn default() -> Self {
        ServeOptions {
            token: None,
            body_limit: super::http::DEFAULT_BODY_LIMIT,
            max_in_flight: super::stdio::DEFAULT_MAX_IN_FLIGHT,
            timeouts: Timeouts::default(),
        }
    }
}

/// The router of `memcoord serve` over `service`.
pub fn router(service: Arc<MemoryService>, options: &ServeOptions) -> Router {
    let state = Arc::new(
        HttpState::new(service, options.token.clone(), options.body_limit)
            .with_max_in_flight(options.max_in_flight)
            .with_body_timeout(options.timeouts.body),
    );
    serve_router(state)
}

/// Serves the protocol over HTTP on `listener` until `shutdown` completes: then new requests
/// get SHUTTING_DOWN, requests waiting for memory are answered, in-flight ones finish, and the
/// service is shut down (every allocation released). Refuses a listener off loopback without a
/// token.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<MemoryService>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    check_listen_address(&local, options.token.is_some())
        .map_err(|m| std::io::Error::new(std::io::ErrorKind::PermissionDenied, m))?;
    let claim = super::claim::ClaimServer::start(&service, &tokio::runtime::Handle::current())
        .map_err(|e| tracing::warn!("no claim socket, so no exports: {e}"))
        .ok();
    let stopping = Arc::clone(&service);
    let signal = async move {
        shutdown.await;
        stopping.begin_shutdown();
    };
    serve_on(
        listener,
        router(Arc::clone(&service), &options),
        options.timeouts,
        signal,
    )
    .await;
    let released = service.shut_down();
    drop(claim);
    tracing::info!("released {released} allocations");
    Ok(())
}
