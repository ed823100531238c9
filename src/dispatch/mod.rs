//! Dispatch: a request line becomes a typed request, a service call, and a response line. The
//! seed's "instructor". Transports hand lines in and write what comes out; they know nothing
//! of actions.

use crate::protocol::envelope::{parse_request, write_error, write_success};
use crate::protocol::requests::{
    AllocateRequest, AnalyticsRequest, ClearRequest, DeallocateRequest, DeviceRequest,
    GetAllocationsRequest, GetStatusRequest, LeaseRequest, ModelLoadRequest, ModelOptimizeRequest,
    ModelRequest, ModelStatusRequest, OptimizeRequest, OptionalDeviceRequest, TransferIdRequest,
    TransferRequest,
};
use crate::protocol::{ErrorCode, OptimizeResponse, ProtocolError};
use crate::service::{MemoryService, TryAllocate};
use serde::Serialize;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Every action of the contract, and whether this version carries it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `memory.list_devices`
    ListDevices,
    /// `memory.get_status`
    GetStatus,
    /// `memory.get_usage`
    GetUsage,
    /// `memory.get_allocations`
    GetAllocations,
    /// `memory.allocate`
    Allocate,
    /// `memory.deallocate`
    Deallocate,
    /// `memory.clear`
    Clear,
    /// `memory.defragment`
    Defragment,
    /// `memory.optimize`
    Optimize,
    /// `memory.transfer`
    Transfer,
    /// `memory.get_transfer`
    GetTransfer,
    /// `memory.model_load`
    ModelLoad,
    /// `memory.model_unload`
    ModelUnload,
    /// `memory.model_acquire`
    ModelAcquire,
    /// `memory.model_release`
    ModelRelease,
    /// `memory.model_status`
    ModelStatus,
    /// `memory.model_optimize`
    ModelOptimize,
    /// `memory.get_pressure`
    GetPressure,
    /// `memory.analytics`
    Analytics,
    /// `memory.optimization_recs`
    OptimizationRecs,
}

impl Action {
    /// Looks an action up by name.
    pub fn from_name(name: &str) -> Option<Action> {
        Some(match name {
            "memory.list_devices" => Action::ListDevices,
            "memory.get_status" => Action::GetStatus,
            "memory.get_usage" => Action::GetUsage,
            "memory.get_allocations" => Action::GetAllocations,
            "memory.allocate" => Action::Allocate,
            "memory.deallocate" => Action::Deallocate,
            "memory.clear" => Action::Clear,
            "memory.defragment" => Action::Defragment,
            "memory.optimize" => Action::Optimize,
            "memory.transfer" => Action::Transfer,
            "memory.get_transfer" => Action::GetTransfer,
            "memory.model_load" => Action::ModelLoad,
            "memory.model_unload" => Action::ModelUnload,
            "memory.model_acquire" => Action::ModelAcquire,
            "memory.model_release" => Action::ModelRelease,
            "memory.model_status" => Action::ModelStatus,
            "memory.model_optimize" => Action::ModelOptimize,
            "memory.get_pressure" => Action::GetPressure,
            "memory.analytics" => Action::Analytics,
            "memory.optimization_recs" => Action::OptimizationRecs,
            _ => return None,
        })
    }
}

/// A response that needs waiting for (an allocate waiting for memory). The transport runs it
/// on the async runtime; if it panics, the transport answers `request_id` with INTERNAL_ERROR.
pub struct Pending {
    /// The request's id.
    pub request_id: String,
    /// Produces the response line.
    pub response: Pin<Box<dyn Future<Output = Vec<u8>> + Send>>,
}

/// A bound on the requests one session (a stdio worker's host, one HTTP client) has in flight:
/// those answered later (an allocate waiting for memory, a model load, a defragment) and the
/// background work a request leaves running (a transfer without `wait_for_completion`, a
/// scheduled optimize). Requests answered at once take no place. Past the bound, a request that
/// would take a place is refused with `TOO_MANY_REQUESTS` before it changes anything, so a
/// flooding host meets a clear error instead of an unbounded queue.
#[derive(Debug)]
pub struct InFlightLimit {
    count: AtomicUsize,
    max: usize,
}

impl InFlightLimit {
    /// A limit of `max` requests in flight (0 refuses every request that would wait).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(InFlightLimit {
            count: AtomicUsize::new(0),
            max,
        })
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Takes a place, or `None` when all are taken.
    pub fn try_enter(self: &Arc<Self>) -> Option<InFlightTicket> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlightTicket(Arc::clone(self)))
    }

    /// Takes a place, or the `TOO_MANY_REQUESTS` refusal when all are taken.
    pub fn admit(self: &Arc<Self>) -> Result<InFlightTicket, ProtocolError> {
        self.try_enter().ok_or_else(|| self.refusal())
    }

    fn refusal(&self) -> ProtocolError {
        ProtocolError::new(
            ErrorCode::TooManyRequests,
            format!(
                "this client already has {} request(s) in flight, the most allowed \
                 (--max-in-flight); this one was not carried out: retry once some are answered",
                self.in_flight()
            ),
        )
    }
}

/// A place taken in an [`InFlightLimit`]; given back when dropped.
#[derive(Debug)]
pub struct InFlightTicket(Arc<InFlightLimit>);

impl Drop for InFlightTicket {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Gives a request a place in its session's bound, or the refusal.
pub type Admit<'a> = &'a dyn Fn() -> Result<InFlightTicket, ProtocolError>;

/// The ticket of a request that takes a place (none when the caller sets no limit).
type Admission = Result<Option<InFlightTicket>, ProtocolError>;

/// `pending`, holding `ticket` until its answer is made.
fn holding(ticket: Option<InFlightTicket>, pending: Pending) -> Pending {
    match ticket {
        None => pending,
        Some(ticket) => {
            let response = pending.response;
            Pending {
                request_id: pending.request_id,
                response: Box::pin(async move {
                    let out = response.await;
                    drop(ticket);
                    out
                }),
            }
        }
    }
}

/// Turns request lines into response lines.
#[derive(Clone)]
pub struct Dispatcher {
    service: Arc<MemoryService>,
}

/// A response computed on a blocking thread (work that holds the engine in passes, like a
/// defragment), so the reading thread keeps answering other requests meanwhile.
fn on_blocking_thread<T, F>(request_id: &str, work: F) -> Pending
where
    T: Serialize + Send + 'static,
    F: FnOnce() -> Result<T, ProtocolError> + Send + 'static,
{
    let rid = request_id.to_string();
    Pending {
        request_id: request_id.to_string(),
        response: Box::pin(async move {
            let mut out = Vec::with_capacity(512);
            match tokio::task::spawn_blocking(work).await {
                Ok(r) => respond(&mut out, &rid, r),
                Err(_) => internal_error(&mut out, Some(&rid)),
            }
            out
        }),
    }
}

fn respond<T: Serialize>(out: &mut Vec<u8>, id: &str, result: Result<T, ProtocolError>) {
    match result {
        Ok(data) => write_success(out, Some(id), &data),
        Err(e) => write_error(out, Some(id), &e),
    }
}

/// The INTERNAL_ERROR response for a request whose handling panicked.
pub fn internal_error(out: &mut Vec<u8>, request_id: Option<&str>) {
    write_error(
        out,
        request_id,
        &ProtocolError::new(
            ErrorCode::InternalError,
            "internal error while handling the request (this is a bug in memcoord; the worker keeps serving)",
        ),
    );
}

impl Dispatcher {
    /// A dispatcher over a service.
    pub fn new(service: Arc<MemoryService>) -> Self {
        Dispatcher { service }
    }

    /// The service.
    pub fn service(&self) -> &Arc<MemoryService> {
        &self.service
    }

    /// Handles one request line (without its line ending). Appends the response line to `out`,
    /// or returns it as [`Pending`] when it has to wait. No bound on requests in flight.
    pub fn handle_line(&self, line: &[u8], out: &mut Vec<u8>) -> Option<Pending> {
        self.handle(line, out, None)
    }

    /// [`Dispatcher::handle_line`] for a session whose requests in flight are bounded by
    /// `limit`.
    pub fn handle_line_limited(
        &self,
        line: &[u8],
        out: &mut Vec<u8>,
        limit: &Arc<InFlightLimit>,
    ) -> Option<Pending> {
        self.handle(line, out, Some(&|| limit.admit()))
    }

    /// [`Dispatcher::handle_line`] with a bound found only when a request needs a place:
    /// `admit` is called for requests answered later or leaving work running, never for those
    /// answered at once (HTTP looks its client's bound up this way).
    pub fn handle_line_admitting(
        &self,
        line: &[u8],
        out: &mut Vec<u8>,
        admit: Admit<'_>,
    ) -> Option<Pending> {
        self.handle(line, out, Some(admit))
    }

    fn handle(&self, line: &[u8], out: &mut Vec<u8>, limit: Option<Admit<'_>>) -> Option<Pending> {
        let start = out.len();
        match catch_unwind(AssertUnwindSafe(|| {
            self.handle_line_inner(line, out, limit)
        })) {
            Ok(pending) => pending,
            Err(_) => {
                out.truncate(start);
                let id = parse_request(line).ok().map(|r| r.request_id.into_owned());
                internal_error(out, id.as_deref());
                None
            }
        }
    }

    /// A request whose work runs on a blocking thread: parsed, given a place in the session's
    /// bound (`admit`), then run; a bad request or a refusal is answered at once.
    fn blocking<R, T, F>(
        &self,
        id: &str,
        out: &mut Vec<u8>,
        parsed: Result<R, ProtocolError>,
        admit: impl FnOnce() -> Admission,
        work: F,
    ) -> Option<Pending>
    where
        R: Send + 'static,
        T: Serialize + Send + 'static,
        F: FnOnce(&MemoryService, R) -> Result<T, ProtocolError> + Send + 'static,
    {
        match parsed.and_then(|r| Ok((r, admit()?))) {
            Ok((r, ticket)) => {
                let service = Arc::clone(&self.service);
                Some(holding(
                    ticket,
                    on_blocking_thread(id, move || work(&service, r)),
                ))
            }
            Err(e) => {
                write_error(out, Some(id), &e);
                None
            }
        }
    }

    fn handle_line_inner(
        &self,
        line: &[u8],
        out: &mut Vec<u8>,
        limit: Option<Admit<'_>>,
    ) -> Option<Pending> {
        let admit = || -> Admission {
            match limit {
                None => Ok(None),
                Some(admit) => admit().map(Some),
            }
        };
        let request = match parse_request(line) {
            Ok(r) => r,
            Err(e) => {
                write_error(out, e.request_id.as_deref(), &e.error);
                return None;
            }
        };
        let id: &str = &request.request_id;
        let Some(action) = Action::from_name(&request.action) else {
            let e = ProtocolError::new(
                ErrorCode::UnknownAction,
                format!("unknown action `{}`", request.action),
            );
            write_error(out, Some(id), &e);
            return None;
        };
        if self.service.is_shutting_down() {
            let e = ProtocolError::new(
                ErrorCode::ShuttingDown,
                "the worker is stopping; the request was not carried out",
            );
            write_error(out, Some(id), &e);
            return None;
        }
        let data = request.data;
        let s = &self.service;
        match action {
            Action::ListDevices => respond(out, id, Ok(s.list_devices())),
            Action::GetStatus => respond(
                out,
                id,
                GetStatusRequest::parse(data).and_then(|r| s.get_status(&r)),
            ),
            Action::GetUsage => respond(
                out,
                id,
                DeviceRequest::parse(data).and_then(|r| s.get_usage(&r)),
            ),
            Action::GetAllocations => respond(
                out,
                id,
                GetAllocationsRequest::parse(data).and_then(|r| s.get_allocations(&r)),
            ),
            Action::Deallocate => respond(
                out,
                id,
                DeallocateRequest::parse(data).and_then(|r| s.deallocate(&r)),
            ),
            Action::Clear => respond(out, id, ClearRequest::parse(data).and_then(|r| s.clear(&r))),
            Action::Allocate => {
                let started = Instant::now();
                let req = match AllocateRequest::parse(data) {
                    Ok(r) => r,
                    Err(e) => {
                        write_error(out, Some(id), &e);
                        return None;
                    }
                };
                let (req, large) = match s.try_allocate(req, started) {
                    TryAllocate::Ready(r) => {
                        respond(out, id, r);
                        return None;
                    }
                    TryAllocate::Large(req) => (req, true),
                    TryAllocate::MustWait(req) => (req, false),
                };
                // It waits for room, or (large) is placed off this thread first.
                let ticket = match admit() {
                    Ok(t) => t,
                    Err(e) => {
                        s.record_refused(&req);
                        write_error(out, Some(id), &e);
                        return None;
                    }
                };
                let service = Arc::clone(s);
                let rid = id.to_string();
                return Some(holding(
                    ticket,
                    Pending {
                        request_id: id.to_string(),
                        response: Box::pin(async move {
                            let mut out = Vec::with_capacity(512);
                            let req = if large {
                                let blocking = Arc::clone(&service);
                                let attempt = tokio::task::spawn_blocking(move || {
                                    blocking.allocate_large(req, started)
                                })
                                .await;
                                match attempt {
                                    Ok(TryAllocate::Ready(r)) => {
                                        respond(&mut out, &rid, r);
                                        return out;
                                    }
                                    Ok(TryAllocate::MustWait(req) | TryAllocate::Large(req)) => req,
                                    Err(_) => {
                                        internal_error(&mut out, Some(&rid));
                                        return out;
                                    }
                                }
                            } else {
                                req
                            };
                            let r = service.wait_and_allocate(req, started).await;
                            respond(&mut out, &rid, r);
                            out
                        }),
                    },
                ));
            }
            Action::Defragment => {
                return self.blocking(id, out, DeviceRequest::parse(data), admit, |s, r| {
                    s.defragment(&r.device_id, &[])
                });
            }
            Action::Optimize => {
                let req = match OptimizeRequest::parse(data)
                    .and_then(|r| s.check_device(&r.device_id).map(|u| (r, u)))
                    .and_then(|r| Ok((r, admit()?)))
                {
                    Ok(r) => r,
                    Err(e) => {
                        write_error(out, Some(id), &e);
                        return None;
                    }
                };
                let ((req, usage), ticket) = req;
                let service = Arc::clone(s);
                if req.wait_for_completion {
                    return Some(holding(
                        ticket,
                        on_blocking_thread(id, move || service.optimize(&req)),
                    ));
                }
                let scheduled = OptimizeResponse {
                    device_id: req.device_id.clone(),
                    optimization_type: req.optimization_type,
                    freed_bytes: 0,
                    actions: vec!["scheduled".to_string()],
                    usage_before: usage,
                    usage_after: usage,
                    duration_ms: 0.0,
                };
                std::thread::spawn(move || {
                    if let Err(e) = service.optimize(&req) {
                        tracing::warn!("background optimize of {} failed: {e}", req.device_id);
                    }
                    drop(ticket);
                });
                respond(out, id, Ok(scheduled));
            }
            Action::Transfer => {
                // Checked and placed now, in arrival order (both ends are busy from here on);
                // the destination's pages are faulted in and the bytes copied off this thread.
                let started = TransferRequest::parse(data).and_then(|r| {
                    let wait = r.wait_for_completion;
                    let ticket = admit()?;
                    s.start_transfer(&r).map(|t| (t, wait, ticket))
                });
                match started {
                    Err(e) => write_error(out, Some(id), &e),
                    Ok((t, true, ticket)) => {
                        let service = Arc::clone(s);
                        return Some(holding(
                            ticket,
                            on_blocking_thread(id, move || service.run_transfer(&t)),
                        ));
                    }
                    Ok((t, false, ticket)) => {
                        respond(out, id, Ok(&t.wire));
                        let service = Arc::clone(s);
                        std::thread::spawn(move || {
                            if let Err(e) = service.run_transfer(&t) {
                                tracing::warn!("{}", e.message);
                            }
                            drop(ticket);
                        });
                    }
                }
            }
            Action::GetTransfer => respond(
                out,
                id,
                TransferIdRequest::parse(data).and_then(|r| s.get_transfer(&r.transfer_id)),
            ),
            // Reading the file and copying its tensors takes a while: off this thread.
            Action::ModelLoad => {
                return self.blocking(id, out, ModelLoadRequest::parse(data), admit, |s, r| {
                    s.model_load(&r)
                });
            }
            Action::ModelUnload => respond(
                out,
                id,
                ModelRequest::parse(data).and_then(|r| s.model_unload(&r)),
            ),
            Action::ModelAcquire => match ModelRequest::parse(data) {
                Ok(r) => match s.model_acquire_now(&r) {
                    Some(done) => respond(out, id, done),
                    None => {
                        // It waits (for a load to finish, or for room to bring the model
                        // back): off this thread.
                        let ticket = match admit() {
                            Ok(t) => t,
                            Err(e) => {
                                write_error(out, Some(id), &e);
                                return None;
                            }
                        };
                        let service = Arc::clone(s);
                        return Some(holding(
                            ticket,
                            on_blocking_thread(id, move || service.model_acquire(&r)),
                        ));
                    }
                },
                Err(e) => write_error(out, Some(id), &e),
            },
            Action::ModelRelease => respond(
                out,
                id,
                LeaseRequest::parse(data).and_then(|r| s.model_release(&r)),
            ),
            Action::ModelStatus => respond(
                out,
                id,
                ModelStatusRequest::parse(data).and_then(|r| s.model_status(&r)),
            ),
            Action::ModelOptimize => {
                return self.blocking(id, out, ModelOptimizeRequest::parse(data), admit, |s, r| {
                    s.model_optimize(&r)
                });
            }
            Action::GetPressure => respond(
                out,
                id,
                OptionalDeviceRequest::parse(data).and_then(|r| s.get_pressure(&r)),
            ),
            Action::Analytics => respond(
                out,
                id,
                AnalyticsRequest::parse(data).and_then(|r| s.analytics(&r)),
            ),
            // Working out a defragment's outcome walks a device's allocations: off this thread.
            Action::OptimizationRecs => {
                return self.blocking(
                    id,
                    out,
                    OptionalDeviceRequest::parse(data),
                    admit,
                    |s, r| s.optimization_recs(&r),
                );
            }
        }
        None
    }
}
