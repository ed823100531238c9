//! Dispatch: a typed [`Request`] becomes a service call and a typed [`Response`], at once or
//! later ([`Reply`]). The one place that refuses requests while the worker stops and turns a
//! panic into INTERNAL_ERROR (persistent state is recorded by the service itself, before the
//! call that changed it returns). What each action
//! does, and whether it waits, is its own file's business (`api/actions/`); the envelope
//! (`request_id`, JSON lines, HTTP bodies) is the transports'.

use crate::api::{Action, Context, Request, Response, TransportDefaults};
pub use crate::api::{
    Admit, Answer, InFlightLimit, InFlightTicket, Reply, catching_panics, internal_error,
};
use crate::domain::Caller;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::service::MemoryService;
use serde_json::value::RawValue;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

/// Carries out typed requests on a service (the work they leave running belongs to the
/// service: [`MemoryService::spawn_background`]).
#[derive(Clone)]
pub struct Dispatcher {
    service: Arc<MemoryService>,
    defaults: TransportDefaults,
    /// Who its requests come from (the session of the transport that holds this dispatcher):
    /// replaced, never changed in place, when `memory.hello` sets the session's tenant; each
    /// request reads it once, when it starts.
    caller: CallerSlot,
}

/// A session's caller, replaced by `memory.hello`.
pub type CallerSlot = Arc<parking_lot::RwLock<Arc<Caller>>>;

impl Dispatcher {
    /// A dispatcher over a service, for a stream transport ([`TransportDefaults::STREAM`]).
    pub fn new(service: Arc<MemoryService>) -> Self {
        Dispatcher {
            service,
            defaults: TransportDefaults::STREAM,
            caller: Arc::new(parking_lot::RwLock::new(Caller::anonymous())),
        }
    }

    /// The same dispatcher with the defaults of its transport (HTTP:
    /// [`TransportDefaults::HTTP`]), given to every request's context.
    pub fn with_defaults(mut self, defaults: TransportDefaults) -> Self {
        self.defaults = defaults;
        self
    }

    /// The same service, for requests from `caller` (a transport makes one per session).
    pub fn with_caller(&self, caller: Arc<Caller>) -> Self {
        Dispatcher {
            service: Arc::clone(&self.service),
            defaults: self.defaults,
            caller: Arc::new(parking_lot::RwLock::new(caller)),
        }
    }

    /// Who its requests come from now.
    pub fn caller(&self) -> Arc<Caller> {
        Arc::clone(&self.caller.read())
    }

    /// The service.
    pub fn service(&self) -> &Arc<MemoryService> {
        &self.service
    }

    /// Carries out `request`. `admit` gives a request that is answered later, or leaves work
    /// running, a place in its session's bound (None: no bound); it is never called for one
    /// answered at once.
    pub fn call(&self, request: Request, admit: Option<Admit<'_>>) -> Reply<Response> {
        self.run(move || Ok(request), admit)
    }

    /// [`Dispatcher::call`] of `action` with its `data` still to be parsed and checked (after
    /// the shutdown refusal, as the contract orders them).
    pub fn call_action(
        &self,
        action: Action,
        data: Option<&RawValue>,
        admit: Option<Admit<'_>>,
    ) -> Reply<Response> {
        self.run(|| Request::parse(action, data), admit)
    }

    fn run(
        &self,
        request: impl FnOnce() -> Result<Request, ProtocolError>,
        admit: Option<Admit<'_>>,
    ) -> Reply<Response> {
        let started = Instant::now();
        let caller = self.caller();
        let handled = catch_unwind(AssertUnwindSafe(|| {
            if self.service.is_shutting_down() {
                return Reply::Now(Err(ProtocolError::new(
                    ErrorCode::ShuttingDown,
                    "the worker is stopping; the request was not carried out",
                )));
            }
            match request() {
                Ok(request) => {
                    let cx = Context::new(&self.service, started, admit)
                        .with_defaults(self.defaults)
                        .with_caller(&caller)
                        .with_caller_slot(&self.caller);
                    request.handle(&cx)
                }
                Err(e) => Reply::Now(Err(e)),
            }
        }));
        let reply = match handled {
            Ok(Reply::Now(answer)) => Reply::Now(answer),
            Ok(Reply::Later(answer)) => Reply::Later(catching_panics(answer)),
            Err(_) => Reply::Now(Err(internal_error())),
        };
        if caller.session.is_none() && !self.service.tenants().declared() {
            return reply;
        }
        // A session owns the leases and exports it makes: noted here, released when it ends.
        match reply {
            Reply::Now(answer) => Reply::Now(settle(&self.service, &caller, answer)),
            Reply::Later(answer) => {
                let service = Arc::clone(&self.service);
                Reply::later(async move { settle(&service, &caller, answer.await) })
            }
        }
    }
}

/// Notes a lease or an export a session's request made, so the session's end releases it.
/// A request that waited past its session's end (the client went away meanwhile) releases
/// what it made at once, and is answered that it did.
fn settle(
    service: &MemoryService,
    caller: &Caller,
    answer: Result<Response, ProtocolError>,
) -> Result<Response, ProtocolError> {
    let kept = match &answer {
        Ok(Response::ModelAcquire(r)) => {
            service.note_owner(caller, &r.lease_id);
            service.note_lease(caller, &r.lease_id)
        }
        Ok(Response::Export(r)) => {
            service.note_owner(caller, &r.export_id);
            service.note_export(caller, &r.export_id)
        }
        Ok(Response::Allocate(r)) if !r.allocation.persistent => service.session_open(caller),
        _ => true,
    };
    if kept {
        return answer;
    }
    let made = match &answer {
        Ok(Response::ModelAcquire(r)) => {
            let req = crate::api::LeaseRequest {
                lease_id: r.lease_id.clone(),
            };
            let _ = service.model_release(&req);
            format!("lease {}", r.lease_id)
        }
        Ok(Response::Export(r)) => {
            let req = crate::api::ExportIdRequest {
                export_id: r.export_id.clone(),
            };
            let _ = service.unexport(&req);
            format!("export {}", r.export_id)
        }
        Ok(Response::Allocate(r)) => {
            // Freed already when the session's end saw it; NOT_FOUND then.
            let req = crate::api::DeallocateRequest {
                allocation_id: r.allocation.allocation_id.clone(),
                device_id: None,
            };
            let _ = service.deallocate(&req);
            format!("allocation {}", r.allocation.allocation_id)
        }
        _ => String::new(),
    };
    Err(ProtocolError::new(
        ErrorCode::ShuttingDown,
        format!(
            "the session ended (its connection closed) before this request was answered; \
             what it made ({made}) was released"
        ),
    ))
}
