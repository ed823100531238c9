//! The export table (the contract's section 8.3): which allocations other processes may map,
//! under which secret, until when, and what pins them. Plain data; the service fills it and
//! answers claims from it, the claim socket (a transport) passes the descriptors.

use crate::domain::{ExportView, ExportedAllocation, Segment, TensorView};
use std::fs::File;
use std::sync::Arc;
use std::time::SystemTime;
use uuid::Uuid;

/// One live export.
#[derive(Debug)]
pub struct Export {
    /// Its id.
    pub id: Uuid,
    /// Good for one claim (compared in constant time).
    pub secret: String,
    /// The device its memory is on.
    pub device_id: String,
    /// The length of its byte range.
    pub size_bytes: u64,
    /// Its segments, in the order of the byte range.
    pub segments: Vec<Segment>,
    /// The file each segment's descriptor opens, one per segment in the same order (the
    /// shared-memory file for every segment of an `shm` export; for a GPU, the physical
    /// allocation holding the segment).
    pub files: Vec<Arc<File>>,
    /// Its allocations, where they are in the range.
    pub allocations: Vec<ExportedAllocation>,
    /// A model export's tensors.
    pub tensors: Vec<TensorView>,
    /// A model export's model.
    pub model: Option<String>,
    /// The lease a model export was made under: it ends with it.
    pub lease: Option<Uuid>,
    /// Whether the secret was used.
    pub claimed: bool,
    /// When it was made.
    pub created_at: SystemTime,
    /// Until when it may be claimed.
    pub expires_at: SystemTime,
}

impl Export {
    /// What `memory.list_exports` shows of it (no secret).
    pub fn view(&self) -> ExportView {
        ExportView {
            export_id: self.id,
            device_id: self.device_id.clone(),
            size_bytes: self.size_bytes,
            allocations: self.allocations.clone(),
            tensors: self.tensors.clone(),
            claimed: self.claimed,
            created_at: self.created_at,
            expires_at: self.expires_at,
        }
    }
}

/// What a good claim hands over: the segments and, for each, the file its descriptor opens.
#[derive(Debug)]
pub struct Claimed {
    /// The export.
    pub export_id: Uuid,
    /// The device its memory is on.
    pub device_id: String,
    /// The length of its byte range.
    pub size_bytes: u64,
    /// Its segments, in order.
    pub segments: Vec<Segment>,
    /// One file per segment, in the same order.
    pub files: Vec<Arc<File>>,
}

/// Why a claim was refused (all read the same on the wire: the export is not there for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRefused {
    /// No such export, or it ended.
    Unknown,
    /// The secret does not match.
    WrongSecret,
    /// The secret was used already.
    Claimed,
    /// Past `expires_at`.
    Expired,
}

/// Every live export.
#[derive(Debug, Default)]
pub struct ExportTable {
    exports: Vec<Export>,
}

fn same_secret(a: &str, b: &str) -> bool {
    // `subtle` keeps the comparison free of early exits the optimizer might add to a plain
    // loop; only the length (always 64 for a real secret) can show in the time taken.
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl ExportTable {
    /// Adds an export.
    pub fn insert(&mut self, export: Export) {
        self.exports.push(export);
    }

    /// Every export, oldest first.
    pub fn all(&self) -> impl Iterator<Item = &Export> {
        self.exports.iter()
    }

    /// Ends an export; returns it.
    pub fn remove(&mut self, id: &Uuid) -> Option<Export> {
        let k = self.exports.iter().position(|x| x.id == *id)?;
        Some(self.exports.remove(k))
    }

    /// Ends every export `which` selects; returns them.
    pub fn remove_where(&mut self, which: impl Fn(&Export) -> bool) -> Vec<Export> {
        let (gone, kept) = std::mem::take(&mut self.exports)
            .into_iter()
            .partition(|x| which(x));
        self.exports = kept;
        gone
    }

    /// The export holding an allocation, if any.
    pub fn holding(&self, allocation: &Uuid) -> Option<&Export> {
        self.exports
            .iter()
            .find(|x| x.allocations.iter().any(|a| a.allocation_id == *allocation))
    }

    /// Every allocation some export holds (they must stay where they are).
    pub fn fixed_allocations(&self) -> Vec<Uuid> {
        self.exports
            .iter()
            .flat_map(|x| x.allocations.iter().map(|a| a.allocation_id))
            .collect()
    }

    /// A claim: the export's segments and files when the secret matches, was not used and has
    /// not expired at `now`; the secret is then spent.
    pub fn claim(
        &mut self,
        id: &Uuid,
        secret: &str,
        now: SystemTime,
    ) -> Result<Claimed, ClaimRefused> {
        let x = self
            .exports
            .iter_mut()
            .find(|x| x.id == *id)
            .ok_or(ClaimRefused::Unknown)?;
        if !same_secret(&x.secret, secret) {
            return Err(ClaimRefused::WrongSecret);
        }
        if x.claimed {
            return Err(ClaimRefused::Claimed);
        }
        if now > x.expires_at {
            return Err(ClaimRefused::Expired);
        }
        x.claimed = true;
        Ok(Claimed {
            export_id: x.id,
            device_id: x.device_id.clone(),
            size_bytes: x.size_bytes,
            segments: x.segments.clone(),
            files: x.files.clone(),
        })
    }
}
