//! The Unix-domain socket (`--unix PATH` on `memcoord worker` and `memcoord serve`; the
//! contract's section 8.1): each connection speaks exactly the stdio framing (NDJSON,
//! concurrent, out of order, the same limits and `--max-in-flight`), served by its own
//! [`Worker`], and is one session: the peer's pid (SO_PEERCRED) is its
//! `client_pid`, and when the connection ends (EOF, the client dies, the connection drops)
//! what the session holds is released
//! ([`MemoryService::end_session`](crate::service::MemoryService::end_session)).
//!
//! Threads: one accept task on the async runtime; each connection's requests are read on a
//! thread of its own (as stdin's are), answers that wait run on the runtime.

use super::stdio::{Worker, WorkerOptions};
use crate::dispatch::Dispatcher;
use crate::domain::SessionTransport;
use rustc_hash::FxHashMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// The socket file's mode unless `--unix-mode` widens it: only the owner may connect.
pub const DEFAULT_UNIX_MODE: u32 = 0o600;

/// The live connections: a handle on each stream (to end its reading at stop) and its thread.
#[derive(Default)]
struct Connections {
    stopping: bool,
    next: u64,
    live: FxHashMap<u64, (UnixStream, Option<std::thread::JoinHandle<()>>)>,
}

/// A served Unix socket. [`UnixServer::stop`] (or dropping it) stops accepting, ends every
/// connection's session and removes the socket file.
pub struct UnixServer {
    path: PathBuf,
    connections: Arc<Mutex<Connections>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl UnixServer {
    /// Binds `path` (a stale socket file nobody listens on is replaced; any other file there
    /// is an error), sets its mode to `mode`, and serves it on `runtime`. Each connection's
    /// requests go to `dispatcher`'s service as a session of their own.
    pub fn bind(
        path: &Path,
        mode: u32,
        dispatcher: &Dispatcher,
        runtime: &tokio::runtime::Handle,
        options: &WorkerOptions,
    ) -> io::Result<UnixServer> {
        remove_stale(path)?;
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot bind {}: {e}", path.display()))
        })?;
        let bound = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .and_then(|()| listener.set_nonblocking(true))
            .and_then(|()| {
                let _entered = runtime.enter();
                tokio::net::UnixListener::from_std(listener)
            });
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        let connections = Arc::new(Mutex::new(Connections::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(accept_loop(
            listener,
            dispatcher.clone(),
            runtime.clone(),
            options.clone(),
            Arc::clone(&connections),
            stopped,
        ));
        Ok(UnixServer {
            path: path.to_path_buf(),
            connections,
            stop: Some(stop),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, ends every connection (its in-flight requests answered, its session's
    /// holdings released), waits for them, and removes the socket file. Blocks: call it off
    /// the async runtime's threads.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        let Some(stop) = self.stop.take() else {
            return;
        };
        let _ = stop.send(());
        let _ = std::fs::remove_file(&self.path);
        let threads: Vec<_> = {
            let mut c = self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            c.stopping = true;
            c.live
                .values_mut()
                .filter_map(|(stream, thread)| {
                    // The reader sees end of input and finishes its session.
                    let _ = stream.shutdown(std::net::Shutdown::Read);
                    thread.take()
                })
                .collect()
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Removes `path` if it is a socket nobody listens on (left by a process that was killed).
fn remove_stale(path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use: another process serves it", path.display()),
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

async fn accept_loop(
    listener: tokio::net::UnixListener,
    dispatcher: Dispatcher,
    runtime: tokio::runtime::Handle,
    options: WorkerOptions,
    connections: Arc<Mutex<Connections>>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            biased;
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: wait for some to be closed.
                    tracing::error!("accepting a Unix-socket connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if let Err(e) = start_connection(stream, &dispatcher, &runtime, &options, &connections) {
            tracing::warn!("a Unix-socket connection could not be served: {e}");
        }
    }
}

fn start_connection(
    stream: tokio::net::UnixStream,
    dispatcher: &Dispatcher,
    runtime: &tokio::runtime::Handle,
    options: &WorkerOptions,
    connections: &Arc<Mutex<Connections>>,
) -> io::Result<()> {
    let pid = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .and_then(|p| u32::try_from(p).ok());
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    let (output, handle) = (stream.try_clone()?, stream.try_clone()?);
    let mut c = connections.lock().unwrap_or_else(PoisonError::into_inner);
    if c.stopping {
        return Ok(());
    }
    let id = c.next;
    c.next += 1;
    let service = dispatcher.service();
    let caller = service.open_session(SessionTransport::Unix, pid);
    let session = caller.session;
    let worker = Worker::start_session(dispatcher.with_caller(caller), runtime.clone(), output);
    let (options, registry) = (options.clone(), Arc::clone(connections));
    let thread = std::thread::Builder::new()
        .name(format!("memcoord-unix-{id}"))
        .spawn(move || {
            worker.serve_polled(&stream, &options);
            drop(worker);
            registry
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .live
                .remove(&id);
        });
    match thread {
        Ok(t) => {
            c.live.insert(id, (handle, Some(t)));
            Ok(())
        }
        Err(e) => {
            if let Some(session) = session {
                service.end_session(session);
            }
            Err(e)
        }
    }
}

/// Reads `--unix-mode`: octal permissions (`600`, `0660`).
pub fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("--unix-mode must be octal permissions like 600 or 660, got {text}"))
}

/// `memcoord serve --unix PATH` without `--listen`: serves `server` (and the claim socket of
/// exports) until `shutdown`; then requests waiting for memory are answered SHUTTING_DOWN, the
/// socket's sessions end and the service is shut down.
pub fn serve_alone(
    runtime: &tokio::runtime::Handle,
    service: &Arc<crate::service::MemoryService>,
    server: Option<UnixServer>,
    shutdown: &crate::runtime::Shutdown,
) {
    let claim = super::claim::ClaimServer::start(service, runtime)
        .map_err(|e| tracing::warn!("no claim socket, so no exports: {e}"))
        .ok();
    shutdown.wait_blocking();
    service.begin_shutdown();
    if let Some(s) = server {
        s.stop();
    }
    let released = service.shut_down();
    drop(claim);
    tracing::info!("released {released} allocations");
}
