//! `memory.transfer` and `memory.get_transfer`: a transfer is accepted (rules checked, the
//! destination placed) in arrival order, then copied chunk by chunk off the reading thread.

use super::*;
use crate::domain::TransferRecord;

/// A transfer accepted and ready to copy. Dropped before it settles (never run: its thread
/// could not start, the worker stopped first; or a panic mid-copy), it undoes itself: the
/// destination is freed, the source is no longer busy and keeps its bytes, and the transfer
/// reads Failed. So no path leaves an allocation busy forever.
pub struct StartedTransfer {
    id: Uuid,
    size: u64,
    copy: bool,
    ends: Ends,
    /// What to answer now.
    pub wire: MemoryTransfer,
}

/// The two ends of a transfer in progress, and what undoes them.
struct Ends {
    engine: Arc<Mutex<AllocationEngine>>,
    transfers: Arc<Mutex<TransferTable>>,
    clock: Arc<dyn crate::managers::clock::Clock>,
    id: Uuid,
    source: Uuid,
    destination: Uuid,
    /// The destination's pages, still to be faulted in (by `run_transfer`, without the
    /// engine); `None` once they are.
    pending: Option<DeferredCommit>,
    /// Completed, or already undone.
    settled: bool,
}

impl Ends {
    /// Frees the destination (its pages given back whether or not they were committed) and
    /// leaves the source as it was.
    fn undo(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let mut e = self.engine.lock();
        match &self.pending {
            Some(p) => e.abandon_transfer(&self.source, &self.destination, p),
            None => e.abort_transfer(&self.source, &self.destination),
        }
    }
}

impl Drop for Ends {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.undo();
        self.transfers.lock().finish(
            &self.id,
            TransferStatus::Failed,
            Some(
                "the transfer was abandoned before it completed (the worker stopped, or the \
                 copy could not run); the source is intact"
                    .into(),
            ),
            self.clock.wall(),
        );
    }
}

impl MemoryService {
    /// `memory.transfer`, first half: checks the rules, allocates the destination (no waiting:
    /// no room is OUT_OF_MEMORY) and records the transfer as Running. Nothing is copied yet.
    pub fn start_transfer(&self, req: &TransferRequest) -> Result<StartedTransfer, ProtocolError> {
        let _recorded = self.recording();
        let (source, destination, size, pending) = {
            let mut e = self.engine.lock();
            let src = e.device_index(&req.source_device_id)?;
            let dst = e.device_index(&req.destination_device_id)?;
            if req.mode == TransferMode::Move {
                // A move frees the source: not while an export holds it (a copy only reads).
                self.check_not_exported(&req.allocation_id)?;
            }
            e.begin_transfer(&req.allocation_id, src, dst, self.now())?
        };
        let copy = req.mode == TransferMode::Copy;
        let id = Uuid::new_v4();
        let record = TransferRecord {
            transfer_id: id,
            allocation_id: source,
            destination_allocation_id: Some(if copy { destination } else { source }),
            source_device_id: req.source_device_id.clone(),
            destination_device_id: req.destination_device_id.clone(),
            mode: req.mode,
            status: TransferStatus::Running,
            total_bytes: size,
            bytes_transferred: 0,
            progress_percentage: 0.0,
            bandwidth_bytes_per_second: 0.0,
            started_at: self.now(),
            completed_at: None,
            error_message: None,
        };
        self.transfers.lock().start(record.clone());
        let wire = record.into();
        Ok(StartedTransfer {
            id,
            size,
            copy,
            ends: Ends {
                engine: Arc::clone(&self.engine),
                transfers: Arc::clone(&self.transfers),
                clock: Arc::clone(&self.clock),
                id,
                source,
                destination,
                pending,
                settled: false,
            },
            wire,
        })
    }

    /// `memory.transfer`, second half: copies chunk by chunk (releasing the engine between
    /// chunks), then completes the move or copy. On failure the destination is freed, the
    /// source is left as it was, and the transfer is Failed (TRANSFER_FAILED).
    pub fn run_transfer(&self, mut t: StartedTransfer) -> Result<MemoryTransfer, ProtocolError> {
        let _recorded = self.recording();
        let mut done = 0u64;
        let mut failure = None;
        let committed = t.ends.pending.as_ref().map(|pending| {
            let _open = self.commit_gate.read();
            pending.commit()
        });
        match committed {
            None => {}
            Some(Ok(())) => t.ends.pending = None,
            Some(Err(err)) => {
                t.ends.undo();
                let message = format!(
                    "transfer of allocation {} to {} failed: the system refused the destination's pages ({err}); the source is intact",
                    t.wire.allocation_id, t.wire.destination_device_id
                );
                self.transfers.lock().finish(
                    &t.id,
                    TransferStatus::Failed,
                    Some(message.clone()),
                    self.now(),
                );
                return Err(ProtocolError::new(ErrorCode::TransferFailed, message));
            }
        }
        let (source, destination) = (t.ends.source, t.ends.destination);
        while done < t.size {
            let len = self.transfer_chunk_bytes.min(t.size - done);
            let mut engine = self.engine.lock();
            let r = engine.transfer_chunk(&source, &destination, done, len);
            // Hand the engine to whoever waited during the chunk, so other requests are
            // answered between chunks instead of after the whole transfer.
            MutexGuard::unlock_fair(engine);
            if let Err(e) = r {
                failure = Some(e.to_string());
                break;
            }
            done += len;
            self.transfers.lock().progress(&t.id, done);
        }
        if failure.is_none()
            && let Err(e) = self
                .engine
                .lock()
                .finish_transfer(&source, &destination, t.copy)
        {
            failure = Some(e.to_string());
        }
        if failure.is_none() {
            t.ends.settled = true;
        }
        // With a state directory, the outcome (a persistent allocation now on shm, or gone from
        // it) is on disk before the transfer reads Completed, whether or not anyone waits for it.
        self.record_state();
        match failure {
            None => {
                let wire = self.transfers.lock().finish(
                    &t.id,
                    TransferStatus::Completed,
                    None,
                    self.now(),
                );
                Ok(wire.map_or_else(|| t.wire.clone(), MemoryTransfer::from))
            }
            Some(message) => {
                t.ends.undo();
                let message = format!(
                    "transfer of allocation {} from {} to {} failed after {} of {}: {message}; the source is intact",
                    t.wire.allocation_id,
                    t.wire.source_device_id,
                    t.wire.destination_device_id,
                    format_bytes(done),
                    format_bytes(t.size)
                );
                self.transfers.lock().finish(
                    &t.id,
                    TransferStatus::Failed,
                    Some(message.clone()),
                    self.now(),
                );
                Err(ProtocolError::new(ErrorCode::TransferFailed, message))
            }
        }
    }

    /// `memory.transfer` run to completion.
    pub fn transfer(&self, req: &TransferRequest) -> Result<MemoryTransfer, ProtocolError> {
        let t = self.start_transfer(req)?;
        self.run_transfer(t)
    }

    /// Transfers still running (for progress displays).
    pub fn running_transfers(&self) -> Vec<MemoryTransfer> {
        let running = self.transfers.lock().running();
        running.into_iter().map(MemoryTransfer::from).collect()
    }

    /// `memory.get_transfer`.
    pub fn get_transfer(&self, transfer_id: &str) -> Result<MemoryTransfer, ProtocolError> {
        let found = Uuid::parse_str(transfer_id)
            .ok()
            .and_then(|id| self.transfers.lock().get(&id));
        found.map(MemoryTransfer::from).ok_or_else(|| {
            ProtocolError::new(
                ErrorCode::TransferNotFound,
                format!("Transfer {transfer_id} not found"),
            )
        })
    }
}
