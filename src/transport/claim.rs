//! The claim socket (the contract's section 8.3): a Unix stream socket, mode 0600 in a
//! private 0700 directory, where another process claims an export. It reads one line
//! `{"export_id", "secret"}`, asks the service ([`MemoryService::claim`]), and answers one line:
//! the segments, with one descriptor per segment passed as SCM_RIGHTS on the line's bytes
//! ([`crate::backends::fdpass::send_with_fds`]), or `{"error_code", "error_message"}` and no
//! descriptor. Then it closes the connection.
//!
//! The worker (stdio) and the HTTP server each start one where they start
//! ([`ClaimServer::start`]) and stop it after the service is shut down; the socket and its
//! directory are removed then. The directory is `$XDG_RUNTIME_DIR/memcoord-<pid>-<n>` (the
//! system's temporary directory when that is not set, or `/tmp` when either would make the
//! socket's path longer than a socket address holds) and the socket `claim.sock` in it. Starting
//! one removes the directories that processes killed before they could remove theirs left
//! there.
//!
//! A client cannot hold the service up: connections are read on the async runtime, not on the
//! threads that answer requests; a client gets [`CLAIM_IO_TIMEOUT`] for its whole line (one
//! that says nothing, or trickles, is answered `INVALID_REQUEST` and closed), a line longer
//! than [`MAX_CLAIM_LINE`] is answered `REQUEST_TOO_LARGE` without being read further, and at
//! most [`MAX_CLAIM_CONNECTIONS`] connections are served at once (more wait in the listen
//! queue). The answer is written by a blocking thread with the same time limit.

use crate::backends::fdpass::send_with_fds;
use crate::protocol::{ClaimRefusal, ClaimRequest, ErrorCode, ProtocolError};
use crate::service::MemoryService;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The longest claim line read, its newline included (an id and a secret take under 200
/// bytes).
pub const MAX_CLAIM_LINE: usize = 4096;

/// How long a client may take to send its whole line, and to take the answer.
pub const CLAIM_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once; more wait in the listen queue until one ends.
pub const MAX_CLAIM_CONNECTIONS: usize = 64;

/// The longest socket path `bind` takes (`sun_path` is 108 bytes, its NUL included).
const MAX_SOCKET_PATH: usize = 107;

static SOCKETS: AtomicU64 = AtomicU64::new(0);

/// A running claim socket; dropping it stops it and removes the socket and its directory.
pub struct ClaimServer {
    path: PathBuf,
    dir: PathBuf,
    service: Weak<MemoryService>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Makes a fresh 0700 directory for the socket: under `$XDG_RUNTIME_DIR` when set, else the
/// system's temporary directory; `/tmp` when the socket's path there would be too long.
fn private_dir() -> io::Result<PathBuf> {
    let preferred = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    // "/memcoord-<pid>-<n>/claim.sock": at most 50 bytes.
    let base = if preferred.as_os_str().len() + 50 <= MAX_SOCKET_PATH {
        preferred
    } else {
        PathBuf::from("/tmp")
    };
    loop {
        let n = SOCKETS.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("memcoord-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                remove_stale(&base, &dir);
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
}

/// Removes what the claim sockets of memcoord processes that are gone left in `base` (a process
/// killed with SIGKILL leaves its directory): directories `memcoord-<pid>-<n>` of pids that no
/// longer run (no `/proc/<pid>`), owned by the owner of `ours`, holding nothing but `claim.sock`
/// (a directory with anything else in it stays).
fn remove_stale(base: &Path, ours: &Path) {
    use std::os::unix::fs::MetadataExt;
    let (Ok(mine), true) = (std::fs::metadata(ours), Path::new("/proc/self").exists()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, n)) = name
            .to_str()
            .and_then(|x| x.strip_prefix("memcoord-"))
            .and_then(|x| x.split_once('-'))
        else {
            continue;
        };
        if !digits(pid) || !digits(n) || Path::new("/proc").join(pid).exists() {
            continue;
        }
        let dir = entry.path();
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() && m.uid() == mine.uid() => {
                let _ = std::fs::remove_file(dir.join("claim.sock"));
                let _ = std::fs::remove_dir(&dir);
            }
            _ => {}
        }
    }
}

impl ClaimServer {
    /// Binds the socket and serves claims for `service` on `runtime` until dropped; tells the
    /// service its path ([`MemoryService::set_claim_socket`]).
    pub fn start(
        service: &Arc<MemoryService>,
        runtime: &tokio::runtime::Handle,
    ) -> io::Result<ClaimServer> {
        let dir = private_dir()?;
        let path = dir.join("claim.sock");
        let bound = std::os::unix::net::UnixListener::bind(&path).and_then(|l| {
            // The directory is 0700 already; the socket is 0600 whatever the umask says.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            l.set_nonblocking(true)?;
            let _entered = runtime.enter();
            tokio::net::UnixListener::from_std(l)
        });
        let listener = match bound {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let weak = Arc::downgrade(service);
        let task = runtime.spawn(accept_loop(listener, weak.clone(), stopped));
        service.set_claim_socket(Some(path.clone()));
        Ok(ClaimServer {
            path,
            dir,
            service: weak,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ClaimServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(service) = self.service.upgrade()
            && service.claim_socket().as_deref() == Some(self.path.as_path())
        {
            service.set_claim_socket(None);
        }
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Accepts connections until stopped or the service is gone, each served on its own task.
async fn accept_loop(
    listener: tokio::net::UnixListener,
    service: Weak<MemoryService>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CLAIM_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => tokio::select! {
                    accepted = listener.accept() => accepted.map(|(s, _)| (s, permit)),
                    _ = &mut stopped => break,
                },
                Err(_) => break,
            },
            _ = &mut stopped => break,
        };
        let (stream, permit) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                tracing::warn!("claim socket: accepting failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(service) = service.upgrade() else {
            break;
        };
        tokio::spawn(async move {
            if let Err(e) = serve_claim(&service, stream).await {
                tracing::debug!("claim connection ended: {e}");
            }
            drop(permit);
        });
    }
}

/// What a client sent.
enum ClaimLine {
    /// A line (its newline, or the end of the stream, ends it).
    Line(Vec<u8>),
    /// More than [`MAX_CLAIM_LINE`] bytes with no newline.
    TooLong,
    /// Nothing: the client closed without writing.
    Nothing,
}

/// Reads up to the first newline, at most [`MAX_CLAIM_LINE`] bytes.
async fn read_line(stream: &mut tokio::net::UnixStream) -> io::Result<ClaimLine> {
    let mut line = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(if line.is_empty() {
                ClaimLine::Nothing
            } else {
                ClaimLine::Line(line)
            });
        }
        if let Some(k) = buf[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..k]);
            return Ok(if line.len() + 1 > MAX_CLAIM_LINE {
                ClaimLine::TooLong
            } else {
                ClaimLine::Line(line)
            });
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() >= MAX_CLAIM_LINE {
            return Ok(ClaimLine::TooLong);
        }
    }
}

/// What a line asks: the claim, or why it is not one.
fn parse_claim(line: &[u8]) -> Result<ClaimRequest, ProtocolError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
        ProtocolError::new(
            ErrorCode::InvalidRequest,
            format!(
                "a claim is one line of JSON, {{\"export_id\": \"…\", \"secret\": \"…\"}}, \
                 ended by a newline; this line is not JSON: {e}"
            ),
        )
    })?;
    if !value.is_object() {
        return Err(ProtocolError::new(
            ErrorCode::InvalidRequest,
            "a claim is a JSON object {\"export_id\": \"…\", \"secret\": \"…\"}",
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        ProtocolError::invalid_parameter(format!(
            "a claim needs export_id and secret, both strings: {e}"
        ))
    })
}

/// One connection: one line in, one line (and the descriptors) out, then closed.
async fn serve_claim(
    service: &MemoryService,
    mut stream: tokio::net::UnixStream,
) -> io::Result<()> {
    let read = tokio::time::timeout(CLAIM_IO_TIMEOUT, read_line(&mut stream)).await;
    let answer = match read {
        Ok(Ok(ClaimLine::Nothing)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => Err(ProtocolError::new(
            ErrorCode::InvalidRequest,
            format!(
                "no claim line within {} seconds: send {{\"export_id\": \"…\", \"secret\": \
                 \"…\"}} and a newline right after connecting",
                CLAIM_IO_TIMEOUT.as_secs()
            ),
        )),
        Ok(Ok(ClaimLine::TooLong)) => Err(ProtocolError::new(
            ErrorCode::RequestTooLarge,
            format!(
                "the claim line is longer than {MAX_CLAIM_LINE} bytes; a claim is \
                 {{\"export_id\": \"…\", \"secret\": \"…\"}} and a newline"
            ),
        )),
        Ok(Ok(ClaimLine::Line(line))) => {
            parse_claim(&line).and_then(|c| service.claim(&c.export_id, &c.secret))
        }
    };
    let stream = stream.into_std()?;
    // The answer is a short line into an empty socket buffer, so this thread is busy for
    // moments; the write time limit bounds it when the client reads nothing.
    tokio::task::spawn_blocking(move || -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(CLAIM_IO_TIMEOUT))?;
        match answer {
            Ok((answer, files)) => {
                let mut bytes = serde_json::to_vec(&answer).map_err(io::Error::other)?;
                bytes.push(b'\n');
                let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
                send_with_fds(&stream, &bytes, &fds)?;
            }
            Err(e) => {
                let refusal = ClaimRefusal {
                    error_code: e.code.as_str().to_string(),
                    error_message: e.message,
                };
                let mut bytes = serde_json::to_vec(&refusal).map_err(io::Error::other)?;
                bytes.push(b'\n');
                (&stream).write_all(&bytes)?;
            }
        }
        // Bytes the client sent after its line are read and dropped (up to 64 KiB): closing
        // with them unread would make the client's next read fail instead of seeing the end.
        stream.set_nonblocking(true)?;
        let mut rest = [0u8; 4096];
        for _ in 0..16 {
            match (&stream).read(&mut rest) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        stream.shutdown(std::net::Shutdown::Both)
    })
    .await
    .map_err(io::Error::other)?
}
