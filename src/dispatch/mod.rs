//! Dispatch: a typed [`Request`] becomes a service call and a typed [`Response`], at once or
//! later ([`Reply`]). The one place that refuses requests while the worker stops, turns a
//! panic into INTERNAL_ERROR, and records persistent state after a request. What each action
//! does, and whether it waits, is its own file's business (`api/actions/`); the envelope
//! (`request_id`, JSON lines, HTTP bodies) is the transports'.

use crate::api::{Action, Context, Request, Response};
pub use crate::api::{
    Admit, Answer, InFlightLimit, InFlightTicket, Reply, TaskSet, catching_panics, internal_error,
};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::service::MemoryService;
use serde_json::value::RawValue;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

/// Carries out typed requests on a service, and owns the work they leave running.
#[derive(Clone)]
pub struct Dispatcher {
    service: Arc<MemoryService>,
    tasks: Arc<TaskSet>,
}

impl Dispatcher {
    /// A dispatcher over a service.
    pub fn new(service: Arc<MemoryService>) -> Self {
        Dispatcher {
            service,
            tasks: TaskSet::new(),
        }
    }

    /// The service.
    pub fn service(&self) -> &Arc<MemoryService> {
        &self.service
    }

    /// The background work requests left running (a transfer or an optimize without
    /// `wait_for_completion`); shutdown waits for it ([`TaskSet::wait`]).
    pub fn tasks(&self) -> &Arc<TaskSet> {
        &self.tasks
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
        let handled = catch_unwind(AssertUnwindSafe(|| {
            if self.service.is_shutting_down() {
                return Reply::Now(Err(ProtocolError::new(
                    ErrorCode::ShuttingDown,
                    "the worker is stopping; the request was not carried out",
                )));
            }
            match request() {
                Ok(request) => {
                    let cx =
                        Context::new(&self.service, started, admit, &self.tasks, after_request);
                    request.handle(&cx)
                }
                Err(e) => Reply::Now(Err(e)),
            }
        }));
        match handled {
            Ok(Reply::Now(answer)) => {
                after_request(&self.service);
                Reply::Now(answer)
            }
            Ok(Reply::Later(answer)) => {
                let service = Arc::clone(&self.service);
                let answer = catching_panics(answer);
                Reply::later(async move {
                    let answer = answer.await;
                    after_request(&service);
                    answer
                })
            }
            Err(_) => Reply::Now(Err(internal_error())),
        }
    }
}

/// After every request (and every piece of background work): with a state directory, a change
/// to persistent shm allocations is on disk before the answer that reports it goes out.
fn after_request(service: &MemoryService) {
    if service.has_state() {
        service.record_state();
    }
}
