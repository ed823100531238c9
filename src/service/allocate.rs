//! `memory.allocate`: the entry points (at once, waiting for room, large ones faulted in off
//! the engine) and the answer they share.

use super::*;

/// The result of trying to allocate without waiting.
// Returned once per request and matched at once, never stored: boxing would cost an
// allocation on the hot path for nothing.
#[allow(clippy::large_enum_variant)]
pub enum TryAllocate {
    /// Done (or failed for good).
    Ready(Result<AllocateMemoryResponse, ProtocolError>),
    /// No room now; the request should wait up to its timeout.
    MustWait(AllocateRequest),
    /// Large: its pages should be faulted in off the reading thread and without the engine,
    /// by [`MemoryService::allocate_large`].
    Large(AllocateRequest),
}

/// The answer to an allocate still waiting when its session ended (the client closed the
/// connection or died): nobody reads it, but it is written if the connection still can be.
fn session_ended(req: &AllocateRequest) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::ShuttingDown,
        format!(
            "{}: the session ended (its connection closed) while the allocation of {} waited \
             for room; it was not made",
            req.device_id,
            format_bytes(req.size_bytes)
        ),
    )
}

/// Allocations at least this large fault their pages in without holding the engine, on a
/// blocking thread, so other requests are answered meanwhile.
pub const LARGE_ALLOCATION_BYTES: u64 = 16 << 20;

impl MemoryService {
    /// `memory.allocate` without waiting: done, failed, must wait for room, or large.
    pub fn try_allocate(&self, req: AllocateRequest, started: Instant) -> TryAllocate {
        let _recorded = self.recording();
        if req.size_bytes >= LARGE_ALLOCATION_BYTES
            && req.allocation_type != MemoryAllocationType::Reservation
        {
            return TryAllocate::Large(req);
        }
        let mut e = self.engine.lock();
        let d = match e.device_index(&req.device_id) {
            Ok(d) => d,
            Err(err) => return TryAllocate::Ready(Err(err.into())),
        };
        let mut attempt = Self::allocate_locked(&mut e, d, &req, started, self.now());
        if matches!(attempt, Err(EngineError::NoRoom { .. })) {
            // Make room from idle models, then try once more.
            drop(e);
            let made = self.make_room_for(&req.device_id, d, req.size_bytes);
            e = self.engine.lock();
            if !made.is_empty() {
                attempt =
                    Self::allocate_locked(&mut e, d, &req, started, self.now()).map(|mut r| {
                        r.message = format!("{}; made room: {}", r.message, made.join(", "));
                        r
                    });
            }
        }
        match attempt {
            Err(EngineError::NoRoom { .. }) if req.timeout_seconds > 0.0 => {
                TryAllocate::MustWait(req)
            }
            Err(err) => {
                if matches!(
                    err,
                    EngineError::NoRoom { .. }
                        | EngineError::OverBudget { .. }
                        | EngineError::TooMany { .. }
                        | EngineError::Backend(_)
                ) {
                    e.record_failure(d, req.size_bytes);
                }
                TryAllocate::Ready(Err(err.into()))
            }
            Ok(resp) => TryAllocate::Ready(Ok(resp)),
        }
    }

    fn spec(req: &AllocateRequest) -> AllocationSpec {
        AllocationSpec {
            size: req.size_bytes,
            alignment: req.alignment,
            kind: req.allocation_type,
            purpose: req.purpose.clone(),
            persistent: req.persistent,
            owner: Owner::Client,
            holder: Arc::clone(&req.holder),
        }
    }

    /// A large `memory.allocate` (see [`TryAllocate::Large`]): places it under the engine,
    /// faults its pages in without it, then publishes it. Blocks; call it off the reading
    /// thread. Returns `MustWait` when there is no room now and the request may wait.
    pub fn allocate_large(&self, req: AllocateRequest, started: Instant) -> TryAllocate {
        let _recorded = self.recording();
        let _open = self.commit_gate.read();
        let now = self.now();
        let mut made = Vec::new();
        let placed = {
            let mut e = self.engine.lock();
            let d = match e.device_index(&req.device_id) {
                Ok(d) => d,
                Err(err) => return TryAllocate::Ready(Err(err.into())),
            };
            let mut placed = e.try_allocate_deferred(d, &Self::spec(&req), now);
            if matches!(placed, Err(EngineError::NoRoom { .. })) {
                drop(e);
                made = self.make_room_for(&req.device_id, d, req.size_bytes);
                e = self.engine.lock();
                if !made.is_empty() {
                    placed = e.try_allocate_deferred(d, &Self::spec(&req), now);
                }
            }
            match placed {
                Ok((id, pending)) => (d, id, pending),
                Err(EngineError::NoRoom { .. }) if req.timeout_seconds > 0.0 => {
                    return TryAllocate::MustWait(req);
                }
                Err(err) => {
                    // A request over its tenant's quota changed nothing, counters included.
                    if !matches!(err, EngineError::QuotaExceeded { .. }) {
                        e.record_failure(d, req.size_bytes);
                    }
                    return TryAllocate::Ready(Err(err.into()));
                }
            }
        };
        let (d, id, pending) = placed;
        if let Some(pending) = pending {
            let committed = pending.commit();
            let mut e = self.engine.lock();
            e.finish_deferred(&id, &pending, committed.is_ok());
            if let Err(err) = committed {
                e.record_failure(d, req.size_bytes);
                return TryAllocate::Ready(Err(ProtocolError::new(
                    ErrorCode::OutOfMemory,
                    format!(
                        "{}: requested {}, but the system refused the pages: {err}",
                        req.device_id,
                        format_bytes(req.size_bytes)
                    ),
                )));
            }
        }
        let mut e = self.engine.lock();
        TryAllocate::Ready(
            Self::respond_allocated(&mut e, d, &req, id, started, now)
                .map(|mut r| {
                    if !made.is_empty() {
                        r.message = format!("{}; made room: {}", r.message, made.join(", "));
                    }
                    r
                })
                .map_err(Into::into),
        )
    }

    fn allocate_locked(
        e: &mut AllocationEngine,
        d: usize,
        req: &AllocateRequest,
        started: Instant,
        now: SystemTime,
    ) -> Result<AllocateMemoryResponse, EngineError> {
        let id = e.try_allocate(d, &Self::spec(req), now)?;
        Self::respond_allocated(e, d, req, id, started, now)
    }

    fn respond_allocated(
        e: &mut AllocationEngine,
        d: usize,
        req: &AllocateRequest,
        id: Uuid,
        started: Instant,
        now: SystemTime,
    ) -> Result<AllocateMemoryResponse, EngineError> {
        let allocation = e
            .allocation_by_id(&id)
            .ok_or_else(|| EngineError::AllocationNotFound(id.to_string()))?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        e.record_allocation_time(d, ms);
        let available = e.available(d);
        Ok(AllocateMemoryResponse {
            device_id: req.device_id.clone(),
            message: format!(
                "allocated {} on {}",
                format_bytes(req.size_bytes),
                req.device_id
            ),
            allocation: allocation.into(),
            success: true,
            allocation_time_ms: ms,
            available_memory_bytes: available,
            utilization_percentage: e.utilization(d),
            allocated_at: Timestamp(now),
        })
    }

    /// `memory.allocate`, waiting up to `timeout_seconds` for room.
    pub async fn allocate(
        &self,
        req: AllocateRequest,
    ) -> Result<AllocateMemoryResponse, ProtocolError> {
        let started = Instant::now();
        let attempt = match self.try_allocate(req, started) {
            TryAllocate::Large(req) => self.allocate_large(req, started),
            other => other,
        };
        match attempt {
            TryAllocate::Ready(r) => r,
            TryAllocate::Large(req) | TryAllocate::MustWait(req) => {
                self.wait_and_allocate(req, started).await
            }
        }
    }

    /// `memory.allocate` without waiting for room (no room is OUT_OF_MEMORY at once), for
    /// library callers outside an async runtime.
    pub fn allocate_now(
        &self,
        req: AllocateRequest,
    ) -> Result<AllocateMemoryResponse, ProtocolError> {
        let started = Instant::now();
        let no_room = |req: &AllocateRequest| {
            ProtocolError::new(
                ErrorCode::OutOfMemory,
                format!(
                    "{}: requested {}, not available now",
                    req.device_id,
                    format_bytes(req.size_bytes)
                ),
            )
        };
        let attempt = match self.try_allocate(req, started) {
            TryAllocate::Large(req) => self.allocate_large(req, started),
            other => other,
        };
        match attempt {
            TryAllocate::Ready(r) => r,
            TryAllocate::MustWait(req) | TryAllocate::Large(req) => {
                let mut e = self.engine.lock();
                let d = e.device_index(&req.device_id)?;
                e.record_failure(d, req.size_bytes);
                Err(no_room(&req))
            }
        }
    }

    /// Counts an allocate refused before it could wait (its client has too many requests in
    /// flight) as a failed allocation of its device.
    pub fn record_refused(&self, req: &AllocateRequest) {
        let mut e = self.engine.lock();
        if let Ok(d) = e.device_index(&req.device_id) {
            e.record_failure(d, req.size_bytes);
        }
    }

    /// Waits for room (woken by every free) until the request's deadline, then allocates.
    pub async fn wait_and_allocate(
        &self,
        req: AllocateRequest,
        started: Instant,
    ) -> Result<AllocateMemoryResponse, ProtocolError> {
        let _recorded = self.recording();
        let deadline = started + Duration::from_secs_f64(req.timeout_seconds);
        let d = {
            let mut e = self.engine.lock();
            let d = e.device_index(&req.device_id)?;
            // A bounded queue: past the limit, a request that would wait is refused at once.
            if e.waiting(d) >= self.max_waiting {
                e.record_failure(d, req.size_bytes);
                return Err(ProtocolError::new(
                    ErrorCode::OutOfMemory,
                    format!(
                        "{}: requested {}, not available now, and {} request(s) already wait \
                         for memory there (the most allowed, --max-waiting)",
                        req.device_id,
                        format_bytes(req.size_bytes),
                        e.waiting(d)
                    ),
                ));
            }
            e.record_waiting(d, 1);
            d
        };
        // The device's waiting count goes down however this ends, the future dropped unpolled
        // (a runtime shutting down) included.
        struct Waiting<'a>(&'a MemoryService, usize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.engine.lock().record_waiting(self.1, -1);
            }
        }
        let _waiting = Waiting(self, d);
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_shutting_down() {
                break Err(ProtocolError::new(
                    ErrorCode::ShuttingDown,
                    format!(
                        "{}: the worker is stopping; the allocation of {} was not made",
                        req.device_id,
                        format_bytes(req.size_bytes)
                    ),
                ));
            }
            if !self.session_open(&req.holder) {
                break Err(session_ended(&req));
            }
            let attempt = {
                let mut e = self.engine.lock();
                Self::allocate_locked(&mut e, d, &req, started, self.now())
            };
            match attempt {
                Ok(resp) => break Ok(resp),
                Err(EngineError::NoRoom {
                    device,
                    requested,
                    alignment,
                    available,
                    ..
                }) => {
                    if tokio::time::timeout_at(deadline.into(), notified)
                        .await
                        .is_err()
                    {
                        self.engine.lock().record_failure(d, req.size_bytes);
                        break Err(ProtocolError::new(
                            ErrorCode::OutOfMemory,
                            format!(
                                "{device}: requested {}{}, {} available after waiting {} s",
                                format_bytes(requested),
                                crate::managers::allocations::aligned_note(alignment),
                                format_bytes(available),
                                req.timeout_seconds
                            ),
                        ));
                    }
                }
                Err(err) => {
                    self.engine.lock().record_failure(d, req.size_bytes);
                    break Err(err.into());
                }
            }
        }
    }
}
