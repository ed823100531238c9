//! The stdio worker (`memcoord worker`): NDJSON requests on stdin, responses on stdout.
//!
//! [`serve`] is generic over any reader and writer (tests drive it in memory, over a pipe pair:
//! tests/common/inproc.rs); [`run`] binds it to the process's stdin and stdout and to the
//! worker's [`Shutdown`](crate::runtime::Shutdown), and is the only code that touches them.
//!
//! Threads: this thread reads and handles every request that can be answered at once, in
//! arrival order, collecting the responses to everything one read brought in and writing them
//! with one flush. Requests that wait for memory run on the async runtime and write their
//! response when done.
//!
//! Backpressure: answers handed to the writer thread and not yet written are counted in bytes.
//! Past [`MAX_BACKLOG_BYTES`] the reader stops (it reads no more of stdin and handles no more
//! lines) until the writer has caught up, so a host that stops reading stdout while it keeps
//! writing requests meets a full pipe instead of a worker that buffers every answer. Answers of
//! requests that finish on the runtime are never held back (they are bounded by
//! `--max-in-flight`), so each is still written exactly once, at shutdown too.

use super::framing::{Frame, LineReader};
use super::lines::{PendingLine, handle_line, internal_error_line};
use crate::dispatch::{Dispatcher, InFlightLimit};
use crate::protocol::envelope::write_error;
use crate::protocol::{ErrorCode, ProtocolError};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, Once};

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Lines longer than this are answered REQUEST_TOO_LARGE.
    pub max_line_bytes: usize,
    /// Requests of the session that may be in flight at once (see [`InFlightLimit`]).
    pub max_in_flight: usize,
    /// How long a reader of a descriptor spins for the next request before it blocks
    /// ([`super::spin`]; zero: never).
    pub spin: std::time::Duration,
}

/// The default bound on requests in flight, per stdio session and per HTTP client.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            max_line_bytes: 1 << 20,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            spin: std::time::Duration::from_micros(super::spin::DEFAULT_SPIN_MICROS),
        }
    }
}

/// Counts requests still being handled on the runtime.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    fn add(&self) {
        *self
            .count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
    }
    fn done(&self) {
        let mut c = self
            .count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *c -= 1;
        if *c == 0 {
            self.idle.notify_all();
        }
    }
    fn wait_idle(&self) {
        let mut c = self
            .count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *c > 0 {
            c = self
                .idle
                .wait(c)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// Batches at least this large go through the writer thread.
const DIRECT_WRITE_LIMIT: usize = 16 * 1024;

/// The most bytes of answers waiting for the writer thread before the reader stops reading
/// requests (a few thousand small answers).
pub const MAX_BACKLOG_BYTES: usize = 4 << 20;

/// A batch of answers this large is handed to the writer in the middle of a read (and the
/// reader waits for room), so that one read of many small requests cannot make an unbounded
/// batch.
const BATCH_LIMIT: usize = 1 << 20;

/// Bytes handed to the writer thread and not yet written, and a way to wait until they are
/// few enough.
#[derive(Default)]
struct Backlog {
    bytes: AtomicUsize,
    lock: Mutex<()>,
    drained: Condvar,
}

impl Backlog {
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    fn written(&self, n: usize) {
        let before = self.bytes.fetch_sub(n, Ordering::AcqRel);
        if before > MAX_BACKLOG_BYTES && before - n <= MAX_BACKLOG_BYTES {
            // Under the lock, so a reader between its check and its wait cannot miss it.
            let _g = self
                .lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.drained.notify_all();
        }
    }

    fn is_empty(&self) -> bool {
        self.bytes.load(Ordering::Acquire) == 0
    }

    /// Waits until at most [`MAX_BACKLOG_BYTES`] are waiting to be written.
    fn wait_for_room(&self) {
        let mut g = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while self.bytes.load(Ordering::Acquire) > MAX_BACKLOG_BYTES {
            g = self
                .drained
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

fn write_batch(output: &Mutex<Option<Box<dyn Write + Send>>>, bytes: &[u8]) {
    let mut out = output
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(w) = out.as_mut()
        && (w.write_all(bytes).is_err() || w.flush().is_err())
    {
        tracing::warn!("stdout is closed; responses are dropped");
        *out = None;
    }
}

/// A running worker's shared state: what the reader, the runtime tasks and a signal handler
/// all need to finish cleanly.
pub struct Worker {
    dispatcher: Dispatcher,
    runtime: tokio::runtime::Handle,
    /// Responses go here; `None` once output failed (the host went away).
    output: Arc<Mutex<Option<Box<dyn Write + Send>>>>,
    /// Large batches go to the writer thread, so reading and writing overlap.
    to_writer: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Bytes handed to the writer thread and not yet written.
    backlog: Arc<Backlog>,
    in_flight: InFlight,
    stopping: AtomicBool,
    /// Held by the reader while it handles a batch, so a signal never cuts one in half.
    batch: Mutex<()>,
    finished: Once,
    /// What ends with this worker: the whole service (stdio) or one session (a connection).
    role: Role,
}

/// What a [`Worker`] ends when it finishes.
enum Role {
    /// The stdio worker: the service is shut down.
    Process {
        /// Where exports are claimed; stopped (and removed) after the service is shut down.
        claim: Mutex<Option<super::claim::ClaimServer>>,
        /// The Unix socket served beside stdio; stopped (its sessions ended) before the
        /// service is shut down.
        unix: Mutex<Option<super::unix::UnixServer>>,
    },
    /// One Unix-socket connection: its session is ended (what it holds released).
    Session,
}

impl Worker {
    /// Starts the stdio worker writing responses to `output`: its input is one session
    /// (of the process `client_pid`, the parent), and when it finishes the service is shut down.
    pub fn start<W: Write + Send + 'static>(
        dispatcher: Dispatcher,
        runtime: tokio::runtime::Handle,
        output: W,
        client_pid: Option<u32>,
    ) -> Arc<Worker> {
        let claim = super::claim::ClaimServer::start(dispatcher.service(), &runtime)
            .map_err(|e| tracing::warn!("no claim socket, so no exports: {e}"))
            .ok();
        let caller = dispatcher
            .service()
            .open_session(crate::domain::SessionTransport::Stdio, client_pid);
        let role = Role::Process {
            claim: Mutex::new(claim),
            unix: Mutex::new(None),
        };
        Self::with_role(dispatcher.with_caller(caller), runtime, output, role)
    }

    /// Starts a worker for one session (a Unix-socket connection) whose requests come from
    /// `dispatcher`'s caller: when it finishes, the session ends and what it holds is released.
    pub fn start_session<W: Write + Send + 'static>(
        dispatcher: Dispatcher,
        runtime: tokio::runtime::Handle,
        output: W,
    ) -> Arc<Worker> {
        Self::with_role(dispatcher, runtime, output, Role::Session)
    }

    /// Serves `server` beside stdio: it is stopped (its sessions ended) before the service is
    /// shut down. Only the stdio worker has one.
    pub fn serve_unix(&self, server: super::unix::UnixServer) {
        if let Role::Process { unix, .. } = &self.role {
            *unix
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(server);
        }
    }

    fn with_role<W: Write + Send + 'static>(
        dispatcher: Dispatcher,
        runtime: tokio::runtime::Handle,
        output: W,
        role: Role,
    ) -> Arc<Worker> {
        let output: Arc<Mutex<Option<Box<dyn Write + Send>>>> =
            Arc::new(Mutex::new(Some(Box::new(output))));
        let backlog = Arc::new(Backlog::default());
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let (out, b) = (Arc::clone(&output), Arc::clone(&backlog));
        let writer = std::thread::Builder::new()
            .name("memcoord-writer".into())
            .spawn(move || {
                while let Ok(batch) = rx.recv() {
                    write_batch(&out, &batch);
                    b.written(batch.len());
                }
            })
            .ok();
        Arc::new(Worker {
            dispatcher,
            runtime,
            output,
            to_writer: Mutex::new(writer.as_ref().map(|_| tx)),
            writer: Mutex::new(writer),
            backlog,
            in_flight: InFlight::default(),
            stopping: AtomicBool::new(false),
            batch: Mutex::new(()),
            finished: Once::new(),
            role,
        })
    }

    /// Writes a batch of response lines with one flush. A small batch with nothing queued is
    /// written in the caller's thread (a thread wake-up costs more latency than the write);
    /// a large one goes to the writer thread so that reading the next requests overlaps with
    /// writing these responses.
    ///
    /// Never waits for room in the backlog (the reader does, in [`Self::emit_and_wait`]): the
    /// runtime's tasks must not block on a host that does not read.
    fn emit(&self, bytes: Vec<u8>) {
        if bytes.len() >= DIRECT_WRITE_LIMIT || !self.backlog.is_empty() {
            let tx = self
                .to_writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(tx) = tx.as_ref() {
                let len = bytes.len();
                self.backlog.add(len);
                match tx.send(bytes) {
                    Ok(()) => return,
                    Err(mpsc::SendError(bytes)) => {
                        self.backlog.written(len);
                        write_batch(&self.output, &bytes);
                        return;
                    }
                }
            }
        }
        write_batch(&self.output, &bytes);
    }

    /// The reader's [`emit`](Self::emit): then, while too many answers are waiting to be
    /// written, it waits (reading no more requests) for the writer to catch up.
    fn emit_and_wait(&self, bytes: Vec<u8>) {
        self.emit(bytes);
        self.backlog.wait_for_room();
    }

    fn spawn_pending(self: &Arc<Self>, pending: PendingLine) {
        /// Counts the request as done however its task ends: answered, or dropped unpolled
        /// by a runtime that shut down (then nothing would answer it, and a finish waiting
        /// for it would wait forever).
        struct Done(Arc<Worker>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.in_flight.done();
            }
        }
        self.in_flight.add();
        let done = Done(Arc::clone(self));
        let task = self.runtime.spawn(pending.response);
        let request_id = pending.request_id;
        self.runtime.spawn(async move {
            let bytes = match task.await {
                Ok(bytes) => bytes,
                Err(_) => {
                    let mut out = Vec::new();
                    internal_error_line(&mut out, Some(&request_id));
                    out
                }
            };
            done.0.emit(bytes);
            drop(done);
        });
    }

    /// Reads and answers requests from `input` until end of input, then finishes.
    pub fn serve<R: Read>(self: &Arc<Self>, input: R, options: &WorkerOptions) {
        self.serve_with(input, options, None);
    }

    /// [`Worker::serve`] of a descriptor (stdin, a socket): between requests the reader
    /// spins briefly before it blocks (`options.spin`, see [`super::spin`]).
    pub fn serve_polled<R: Read + std::os::fd::AsFd>(
        self: &Arc<Self>,
        input: R,
        options: &WorkerOptions,
    ) {
        // The spinner polls a second handle on the same descriptor; the reader owns `input`.
        let fd = match input.as_fd().try_clone_to_owned() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::debug!("no spin before reads: {e}");
                None
            }
        };
        let spinner = fd
            .as_ref()
            .and_then(|fd| super::spin::Spinner::new(fd, options.spin));
        self.serve_with(input, options, spinner);
    }

    fn serve_with<R: Read>(
        self: &Arc<Self>,
        input: R,
        options: &WorkerOptions,
        mut spinner: Option<super::spin::Spinner<'_>>,
    ) {
        let mut reader = LineReader::new(input, options.max_line_bytes);
        let limit = InFlightLimit::new(options.max_in_flight);
        let admit = Some(&(|| limit.admit()) as &dyn Fn() -> _);
        let mut out = Vec::with_capacity(64 * 1024);
        let too_large = ProtocolError::new(
            ErrorCode::RequestTooLarge,
            format!(
                "the request line is longer than the limit of {} bytes (--max-line-bytes); it was discarded",
                options.max_line_bytes
            ),
        );
        loop {
            {
                let _batch = self
                    .batch
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                while let Some(frame) = reader.next_frame() {
                    match frame {
                        Frame::Line(line) => {
                            if let Some(p) = handle_line(&self.dispatcher, line, &mut out, admit) {
                                self.spawn_pending(p);
                            }
                        }
                        Frame::TooLarge => write_error(&mut out, None, &too_large),
                    }
                    if out.len() >= BATCH_LIMIT {
                        self.emit_and_wait(std::mem::replace(
                            &mut out,
                            Vec::with_capacity(64 * 1024),
                        ));
                    }
                }
                if !out.is_empty() {
                    self.emit(std::mem::replace(&mut out, Vec::with_capacity(64 * 1024)));
                }
            }
            // No more requests are read while the host leaves too many answers unread.
            self.backlog.wait_for_room();
            if let Some(s) = spinner.as_mut() {
                s.before_read();
            }
            let filled = reader.fill();
            if let Some(s) = spinner.as_mut() {
                s.after_read();
            }
            match filled {
                Ok(true) => {}
                Ok(false) => {
                    // Answer a last line that had no newline, then finish.
                    let _batch = self
                        .batch
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    while let Some(frame) = reader.next_frame() {
                        match frame {
                            Frame::Line(line) if line.iter().all(u8::is_ascii_whitespace) => {}
                            Frame::Line(line) => {
                                if let Some(p) =
                                    handle_line(&self.dispatcher, line, &mut out, admit)
                                {
                                    self.spawn_pending(p);
                                }
                            }
                            Frame::TooLarge => write_error(&mut out, None, &too_large),
                        }
                    }
                    if !out.is_empty() {
                        self.emit(std::mem::take(&mut out));
                    }
                    break;
                }
                Err(e) => {
                    tracing::error!("reading requests failed: {e}");
                    break;
                }
            }
        }
        self.finish();
    }

    /// Stops taking requests (a signal): waits for the batch being handled, then finishes.
    pub fn stop(self: &Arc<Self>) {
        self.stopping.store(true, Ordering::Release);
        let _batch = self
            .batch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.finish();
    }

    /// The stdio worker: requests waiting for memory are answered SHUTTING_DOWN, every other
    /// in-flight request is answered, responses are flushed, the Unix socket beside it is
    /// stopped and the service is shut down
    /// ([`MemoryService::shut_down`](crate::service::MemoryService::shut_down)). A session's
    /// worker: its in-flight requests are answered, then its session ends
    /// ([`MemoryService::end_session`](crate::service::MemoryService::end_session)). Runs once.
    pub fn finish(&self) {
        self.finished.call_once(|| {
            let service = self.dispatcher.service();
            let Role::Process { claim, unix } = &self.role else {
                // The session ends first, so what the client held goes back at once even
                // while some of its requests still wait: those are woken and answered, and
                // one that makes something after this releases it again (the dispatcher).
                if let Some(session) = self.dispatcher.caller().session {
                    service.end_session(session);
                }
                self.in_flight.wait_idle();
                self.close_output();
                return;
            };
            service.begin_shutdown();
            self.in_flight.wait_idle();
            let unix = unix
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(unix) = unix {
                unix.stop();
            }
            self.close_output();
            let released = service.shut_down();
            drop(
                claim
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take(),
            );
            tracing::info!("released {released} allocations; exiting");
        });
    }

    /// Lets the writer thread write what is queued, and waits for it.
    fn close_output(&self) {
        {
            // Closing the channel lets the writer thread write what is queued and end.
            self.to_writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(w) = self
                .writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
            {
                let _ = w.join();
            }
        }
    }
}

/// Serves `input`/`output` until end of input; returns once everything is answered and
/// released. The in-memory entry point for tests.
pub fn serve<R: Read, W: Write + Send + 'static>(
    dispatcher: Dispatcher,
    runtime: tokio::runtime::Handle,
    input: R,
    output: W,
    options: &WorkerOptions,
) {
    let worker = Worker::start(dispatcher, runtime, output, None);
    worker.serve(input, options);
}

/// Runs the worker on the process's stdin and stdout until end of input or `shutdown` (which
/// `main` triggers on SIGTERM or SIGINT); returns once everything is answered and released.
/// End of input triggers `shutdown` too, so whatever else awaits it (a metrics server) stops.
///
/// The reader runs on its own thread: a read of stdin cannot be interrupted, so after a signal
/// it is left blocked there while the process ends.
///
/// `unix`: a Unix socket served beside stdio, stopped (its sessions ended) before the service
/// is shut down.
pub fn run(
    dispatcher: Dispatcher,
    runtime: &tokio::runtime::Runtime,
    options: &WorkerOptions,
    shutdown: &crate::runtime::Shutdown,
    unix: Option<super::unix::UnixServer>,
) -> io::Result<()> {
    /// Triggers the shutdown when the reader ends, however it ends (a panic included), so
    /// `run` never waits for a reader that is gone.
    struct Ended(crate::runtime::Shutdown);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.trigger();
        }
    }
    let parent = Some(std::os::unix::process::parent_id());
    let worker = Worker::start(dispatcher, runtime.handle().clone(), io::stdout(), parent);
    if let Some(unix) = unix {
        worker.serve_unix(unix);
    }
    let (reader, options, eof) = (Arc::clone(&worker), options.clone(), shutdown.clone());
    let reading = std::thread::Builder::new()
        .name("memcoord-stdin".into())
        .spawn(move || {
            let _ended = Ended(eof);
            reader.serve_polled(io::stdin().lock(), &options);
        })?;
    shutdown.wait_blocking();
    // After a signal: waits for the batch being handled, then finishes (after end of input,
    // finished already: nothing more to do).
    worker.stop();
    if reading.is_finished() && reading.join().is_err() {
        return Err(io::Error::other("the request reader panicked"));
    }
    Ok(())
}
