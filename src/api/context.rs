//! What an action's handler is given and gives back: the [`Context`] (the service, the session's
//! bound on requests in flight, the owned background work) and a [`Reply`] (answered at once,
//! or a future for a request that waits).

use crate::domain::Caller;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::service::MemoryService;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Instant;

/// A boxed future of an answer.
pub type Answer<T> = Pin<Box<dyn Future<Output = Result<T, ProtocolError>> + Send>>;

/// A handler's answer: at once, or later (a request that waits for memory or works off the
/// reading thread). A `Later` future runs on the async runtime; a panic in it is answered
/// INTERNAL_ERROR (see [`catching_panics`]).
pub enum Reply<T> {
    /// Answered at once, on the caller's thread.
    Now(Result<T, ProtocolError>),
    /// Answered when the future completes.
    Later(Answer<T>),
}

impl<T: Send + 'static> Reply<T> {
    /// An answer made by `future`.
    pub fn later(future: impl Future<Output = Result<T, ProtocolError>> + Send + 'static) -> Self {
        Reply::Later(Box::pin(future))
    }

    /// The same answer, its success turned by `f`.
    pub fn map<U: Send + 'static>(self, f: fn(T) -> U) -> Reply<U> {
        match self {
            Reply::Now(r) => Reply::Now(r.map(f)),
            Reply::Later(fut) => Reply::Later(Box::pin(async move { fut.await.map(f) })),
        }
    }
}

/// The INTERNAL_ERROR answer of a request whose handling panicked.
pub fn internal_error() -> ProtocolError {
    ProtocolError::new(
        ErrorCode::InternalError,
        "internal error while handling the request (this is a bug in memcoord; the worker keeps serving)",
    )
}

/// `future`, answering [`internal_error`] if it panics.
pub fn catching_panics<T: Send + 'static>(mut future: Answer<T>) -> Answer<T> {
    Box::pin(std::future::poll_fn(move |cx| {
        match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(_) => Poll::Ready(Err(internal_error())),
        }
    }))
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

/// What a handler is given: the service, when the request arrived, the session's bound on
/// requests in flight, and the set that owns background work.
pub struct Context<'a> {
    service: &'a Arc<MemoryService>,
    started: Instant,
    admit: Option<Admit<'a>>,
    defaults: super::TransportDefaults,
    caller: Option<&'a Arc<Caller>>,
    caller_slot: Option<&'a parking_lot::RwLock<Arc<Caller>>>,
}

impl<'a> Context<'a> {
    /// A context for one request. `admit` is the session's bound (None: unbounded).
    pub fn new(
        service: &'a Arc<MemoryService>,
        started: Instant,
        admit: Option<Admit<'a>>,
    ) -> Self {
        Context {
            service,
            started,
            admit,
            defaults: super::TransportDefaults::STREAM,
            caller: None,
            caller_slot: None,
        }
    }

    /// The same context for a request from `caller` (default: [`Caller::anonymous`]).
    pub fn with_caller(mut self, caller: &'a Arc<Caller>) -> Self {
        self.caller = Some(caller);
        self
    }

    /// The same context, able to replace its session's caller (`memory.hello`).
    pub fn with_caller_slot(mut self, slot: &'a parking_lot::RwLock<Arc<Caller>>) -> Self {
        self.caller_slot = Some(slot);
        self
    }

    /// Sets the tenant of the rest of the request's session (`memory.hello`): its next
    /// requests come from the returned caller. Nothing to set outside a session (HTTP).
    pub fn set_tenant(&self, tenant: Arc<str>) -> Arc<Caller> {
        let current = self.caller();
        let caller = Arc::new(Caller {
            session: current.session,
            client_pid: current.client_pid,
            tenant,
        });
        if let (Some(slot), Some(session)) = (self.caller_slot, current.session) {
            *slot.write() = Arc::clone(&caller);
            self.service
                .set_session_caller(&session, Arc::clone(&caller));
        }
        caller
    }

    /// Who made the request: its session, process and tenant.
    pub fn caller(&self) -> Arc<Caller> {
        match self.caller {
            Some(c) => Arc::clone(c),
            None => Caller::anonymous(),
        }
    }

    /// The same context with the defaults of the transport the request came by (default:
    /// [`TransportDefaults::STREAM`](super::TransportDefaults::STREAM)).
    pub fn with_defaults(mut self, defaults: super::TransportDefaults) -> Self {
        self.defaults = defaults;
        self
    }

    /// The defaults of the transport the request came by (see [`super::defaults`]).
    pub fn defaults(&self) -> super::TransportDefaults {
        self.defaults
    }

    /// The service.
    pub fn service(&self) -> &'a Arc<MemoryService> {
        self.service
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// A place in the session's bound for a request that is answered later or leaves work
    /// running (None when the session sets no bound), or the TOO_MANY_REQUESTS refusal.
    pub fn admit(&self) -> Result<Option<InFlightTicket>, ProtocolError> {
        match self.admit {
            None => Ok(None),
            Some(admit) => admit().map(Some),
        }
    }

    /// A request answered from a blocking thread (work that holds the engine in passes, or
    /// reads files), so the reading thread keeps answering others: given a place first.
    pub fn blocking<T, F>(&self, work: F) -> Reply<T>
    where
        T: Send + 'static,
        F: FnOnce(&MemoryService) -> Result<T, ProtocolError> + Send + 'static,
    {
        match self.admit() {
            Ok(ticket) => self.blocking_admitted(ticket, work),
            Err(e) => Reply::Now(Err(e)),
        }
    }

    /// [`Context::blocking`] for a request already given its place.
    pub fn blocking_admitted<T, F>(&self, ticket: Option<InFlightTicket>, work: F) -> Reply<T>
    where
        T: Send + 'static,
        F: FnOnce(&MemoryService) -> Result<T, ProtocolError> + Send + 'static,
    {
        let service = Arc::clone(self.service);
        Reply::later(async move {
            let answer = tokio::task::spawn_blocking(move || work(&service)).await;
            drop(ticket);
            answer.unwrap_or_else(|_| Err(internal_error()))
        })
    }

    /// Leaves `work` running after the answer, on a thread the service owns
    /// ([`MemoryService::spawn_background`]: its shutdown waits for it); `ticket` (its place in
    /// the bound) is held until it ends.
    pub fn background<F>(&self, name: &str, ticket: Option<InFlightTicket>, work: F)
    where
        F: FnOnce(&MemoryService) + Send + 'static,
    {
        let service = Arc::clone(self.service);
        self.service
            .spawn_background(&format!("memcoord-{name}"), move || {
                work(&service);
                drop(ticket);
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_answer_is_an_internal_error() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let answer: Answer<u32> = Box::pin(async { panic!("on purpose") });
        let e = runtime.block_on(catching_panics(answer)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InternalError);
    }

    #[test]
    fn the_bound_refuses_past_its_places_and_gives_them_back() {
        let limit = InFlightLimit::new(1);
        let ticket = limit.admit().unwrap();
        assert_eq!(limit.admit().unwrap_err().code, ErrorCode::TooManyRequests);
        drop(ticket);
        assert!(limit.admit().is_ok());
    }
}
