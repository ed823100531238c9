//! The stdio worker (`memcoord worker`): NDJSON requests on stdin, responses on stdout.
//!
//! [`serve`] is generic over any reader and writer (tests drive it in memory); [`run`] binds it
//! to the process's stdin, stdout and signals, and is the only code that touches them.
//!
//! Threads: this thread reads and handles every request that can be answered at once, in
//! arrival order, collecting the responses to everything one read brought in and writing them
//! with one flush. Requests that wait for memory run on the async runtime and write their
//! response when done.

use super::framing::{Frame, LineReader};
use crate::dispatch::{Dispatcher, InFlightLimit, Pending, internal_error};
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
}

/// The default bound on requests in flight, per stdio session and per HTTP client.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            max_line_bytes: 1 << 20,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
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
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }
    fn done(&self) {
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *c -= 1;
        if *c == 0 {
            self.idle.notify_all();
        }
    }
    fn wait_idle(&self) {
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *c > 0 {
            c = self.idle.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Batches at least this large go through the writer thread.
const DIRECT_WRITE_LIMIT: usize = 16 * 1024;

fn write_batch(output: &Mutex<Option<Box<dyn Write + Send>>>, bytes: &[u8]) {
    let mut out = output.lock().unwrap_or_else(|p| p.into_inner());
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
    /// Batches handed to the writer thread and not yet written.
    queued: Arc<AtomicUsize>,
    in_flight: InFlight,
    stopping: AtomicBool,
    /// Held by the reader while it handles a batch, so a signal never cuts one in half.
    batch: Mutex<()>,
    finished: Once,
}

impl Worker {
    /// Starts a worker writing responses to `output`.
    pub fn start<W: Write + Send + 'static>(
        dispatcher: Dispatcher,
        runtime: tokio::runtime::Handle,
        output: W,
    ) -> Arc<Worker> {
        let output: Arc<Mutex<Option<Box<dyn Write + Send>>>> =
            Arc::new(Mutex::new(Some(Box::new(output))));
        let queued = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let (out, q) = (Arc::clone(&output), Arc::clone(&queued));
        let writer = std::thread::Builder::new()
            .name("memcoord-writer".into())
            .spawn(move || {
                while let Ok(batch) = rx.recv() {
                    write_batch(&out, &batch);
                    q.fetch_sub(1, Ordering::AcqRel);
                }
            })
            .ok();
        Arc::new(Worker {
            dispatcher,
            runtime,
            output,
            to_writer: Mutex::new(writer.as_ref().map(|_| tx)),
            writer: Mutex::new(writer),
            queued,
            in_flight: InFlight::default(),
            stopping: AtomicBool::new(false),
            batch: Mutex::new(()),
            finished: Once::new(),
        })
    }

    /// Writes a batch of response lines with one flush. A small batch with nothing queued is
    /// written in the caller's thread (a thread wake-up costs more latency than the write);
    /// a large one goes to the writer thread so that reading the next requests overlaps with
    /// writing these responses.
    fn emit(&self, bytes: Vec<u8>) {
        if bytes.len() >= DIRECT_WRITE_LIMIT || self.queued.load(Ordering::Acquire) > 0 {
            let tx = self.to_writer.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(tx) = tx.as_ref() {
                self.queued.fetch_add(1, Ordering::AcqRel);
                match tx.send(bytes) {
                    Ok(()) => return,
                    Err(mpsc::SendError(bytes)) => {
                        self.queued.fetch_sub(1, Ordering::AcqRel);
                        write_batch(&self.output, &bytes);
                        return;
                    }
                }
            }
        }
        write_batch(&self.output, &bytes);
    }

    fn spawn_pending(self: &Arc<Self>, pending: Pending) {
        self.in_flight.add();
        let worker = Arc::clone(self);
        let task = self.runtime.spawn(pending.response);
        let request_id = pending.request_id;
        self.runtime.spawn(async move {
            let bytes = match task.await {
                Ok(bytes) => bytes,
                Err(_) => {
                    let mut out = Vec::new();
                    internal_error(&mut out, Some(&request_id));
                    out
                }
            };
            worker.emit(bytes);
            worker.in_flight.done();
        });
    }

    /// Reads and answers requests from `input` until end of input, then finishes.
    pub fn serve<R: Read>(self: &Arc<Self>, input: R, options: &WorkerOptions) {
        let mut reader = LineReader::new(input, options.max_line_bytes);
        let limit = InFlightLimit::new(options.max_in_flight);
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
                let _batch = self.batch.lock().unwrap_or_else(|p| p.into_inner());
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                while let Some(frame) = reader.next_frame() {
                    match frame {
                        Frame::Line(line) => {
                            if let Some(p) =
                                self.dispatcher.handle_line_limited(line, &mut out, &limit)
                            {
                                self.spawn_pending(p);
                            }
                        }
                        Frame::TooLarge => write_error(&mut out, None, &too_large),
                    }
                }
                if !out.is_empty() {
                    self.emit(std::mem::replace(&mut out, Vec::with_capacity(64 * 1024)));
                }
            }
            match reader.fill() {
                Ok(true) => {}
                Ok(false) => {
                    // Answer a last line that had no newline, then finish.
                    let _batch = self.batch.lock().unwrap_or_else(|p| p.into_inner());
                    while let Some(frame) = reader.next_frame() {
                        match frame {
                            Frame::Line(line) if line.iter().all(u8::is_ascii_whitespace) => {}
                            Frame::Line(line) => {
                                if let Some(p) =
                                    self.dispatcher.handle_line_limited(line, &mut out, &limit)
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
        let _batch = self.batch.lock().unwrap_or_else(|p| p.into_inner());
        self.finish();
    }

    /// Requests waiting for memory are answered SHUTTING_DOWN, every other in-flight request
    /// is answered, responses are flushed, and every allocation is released. Runs once.
    pub fn finish(&self) {
        self.finished.call_once(|| {
            let service = self.dispatcher.service();
            service.begin_shutdown();
            self.in_flight.wait_idle();
            // Closing the channel lets the writer thread write what is queued and end.
            self.to_writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = w.join();
            }
            let released = service.release_all();
            service.close();
            tracing::info!("released {released} allocations; exiting");
        });
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
    let worker = Worker::start(dispatcher, runtime, output);
    worker.serve(input, options);
}

/// Runs the worker on the process's stdin and stdout until EOF, SIGTERM or SIGINT; then exits
/// the process with status 0.
pub fn run(
    dispatcher: Dispatcher,
    runtime: &tokio::runtime::Runtime,
    options: &WorkerOptions,
) -> io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let worker = Worker::start(dispatcher, runtime.handle().clone(), io::stdout());
    let mut term = runtime.block_on(async { signal(SignalKind::terminate()) })?;
    let mut int = runtime.block_on(async { signal(SignalKind::interrupt()) })?;
    let on_signal = Arc::clone(&worker);
    runtime.spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received: finishing in-flight requests");
        let _ = tokio::task::spawn_blocking(move || {
            on_signal.stop();
            std::process::exit(0);
        })
        .await;
    });
    worker.serve(io::stdin().lock(), options);
    Ok(())
}
