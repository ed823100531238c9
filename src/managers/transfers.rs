//! The state of transfers between devices, kept for `memory.get_transfer`. The copying itself
//! is driven by the service, chunk by chunk through the allocation engine.

use crate::domain::{TransferRecord, TransferStatus};
use rustc_hash::FxHashMap;
use std::time::{Instant, SystemTime};
use uuid::Uuid;

/// Finished transfers kept for `memory.get_transfer` (oldest dropped first).
pub const KEPT_FINISHED_TRANSFERS: usize = 10_000;

/// One transfer.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// What `memory.transfer` and `memory.get_transfer` report.
    pub record: TransferRecord,
    /// When it started, for its bandwidth (a measurement, not behaviour: real time).
    started: Instant,
    finished_seq: Option<u64>,
}

/// Every transfer in progress and the most recent finished ones.
#[derive(Default)]
pub struct TransferTable {
    transfers: FxHashMap<Uuid, Transfer>,
    finished: u64,
    started_total: u64,
    completed_total: u64,
    failed_total: u64,
}

impl TransferTable {
    /// Records a transfer that starts now.
    pub fn start(&mut self, record: TransferRecord) -> Uuid {
        let id = record.transfer_id;
        self.started_total += 1;
        self.transfers.insert(
            id,
            Transfer {
                record,
                started: Instant::now(),
                finished_seq: None,
            },
        );
        id
    }

    /// A transfer as reported now.
    pub fn get(&self, id: &Uuid) -> Option<TransferRecord> {
        self.transfers.get(id).map(|t| t.record.clone())
    }

    /// Transfers still running.
    pub fn running(&self) -> Vec<TransferRecord> {
        self.transfers
            .values()
            .filter(|t| t.finished_seq.is_none())
            .map(|t| t.record.clone())
            .collect()
    }

    /// Transfers since the start by how they stand: `(status, count)` for Running (now),
    /// Completed and Failed (Cancelled included).
    pub fn status_counts(&self) -> Vec<(&'static str, u64)> {
        let running = self
            .started_total
            .saturating_sub(self.completed_total + self.failed_total);
        vec![
            ("Running", running),
            ("Completed", self.completed_total),
            ("Failed", self.failed_total),
        ]
    }

    /// Running transfers and the most recent finished ones, `limit` in all, newest first.
    pub fn recent(&self, limit: usize) -> Vec<TransferRecord> {
        let mut v: Vec<&Transfer> = self.transfers.values().collect();
        v.sort_by_key(|t| std::cmp::Reverse(t.finished_seq.map_or(u64::MAX, |s| s)));
        v.into_iter()
            .take(limit)
            .map(|t| t.record.clone())
            .collect()
    }

    /// Counts copied bytes.
    pub fn progress(&mut self, id: &Uuid, bytes_transferred: u64) {
        if let Some(t) = self.transfers.get_mut(id) {
            let w = &mut t.record;
            w.bytes_transferred = bytes_transferred;
            w.progress_percentage = if w.total_bytes == 0 {
                100.0
            } else {
                bytes_transferred as f64 / w.total_bytes as f64 * 100.0
            };
            let secs = t.started.elapsed().as_secs_f64();
            w.bandwidth_bytes_per_second = if secs > 0.0 {
                bytes_transferred as f64 / secs
            } else {
                0.0
            };
        }
    }

    /// Ends a transfer with a status (and an error message when it failed), `at` the
    /// service's clock's now.
    pub fn finish(
        &mut self,
        id: &Uuid,
        status: TransferStatus,
        error: Option<String>,
        at: SystemTime,
    ) -> Option<TransferRecord> {
        let seq = self.finished;
        self.finished += 1;
        let t = self.transfers.get_mut(id)?;
        match status {
            TransferStatus::Completed => self.completed_total += 1,
            TransferStatus::Failed | TransferStatus::Cancelled => self.failed_total += 1,
            _ => {}
        }
        t.record.status = status;
        t.record.completed_at = Some(at);
        t.record.error_message = error;
        t.finished_seq = Some(seq);
        let record = t.record.clone();
        if self.transfers.len() > KEPT_FINISHED_TRANSFERS {
            let cutoff = self.finished.saturating_sub(KEPT_FINISHED_TRANSFERS as u64);
            self.transfers
                .retain(|_, t| t.finished_seq.is_none_or(|s| s >= cutoff));
        }
        Some(record)
    }
}
