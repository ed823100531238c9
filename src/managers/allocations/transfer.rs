//! Transfers between devices: the destination placed and hidden, the bytes copied chunk by
//! chunk, then the move or copy completed (or abandoned, the source intact).

use super::*;

impl AllocationEngine {
    /// Starts a transfer of `allocation_id` from `src` to `dst`: checks the rules, allocates
    /// the destination (same size, alignment, type, purpose and persistence; no waiting) and
    /// marks both ends busy. Returns the source and destination ids and the size.
    pub fn begin_transfer(
        &mut self,
        allocation_id: &str,
        src: usize,
        dst: usize,
        now: SystemTime,
    ) -> Result<(Uuid, Uuid, u64, Option<DeferredCommit>), EngineError> {
        if src == dst {
            return Err(EngineError::InvalidTransfer(
                "Source and destination cannot be the same".into(),
            ));
        }
        let (id, r) = self.record(allocation_id)?;
        if r.hidden {
            return Err(EngineError::AllocationNotFound(allocation_id.to_string()));
        }
        if r.device as usize != src {
            return Err(EngineError::InvalidTransfer(format!(
                "Allocation {allocation_id} is on {}, not on {}",
                self.device_id(r.device as usize),
                self.device_id(src)
            )));
        }
        if r.placement.is_none() {
            return Err(EngineError::InvalidTransfer(format!(
                "Allocation {allocation_id} is a Reservation: it holds no bytes to transfer"
            )));
        }
        if let Some(e) = r.in_use(allocation_id, "is already being transferred", "") {
            return Err(e);
        }
        let spec = r.twin_spec();
        let size = r.size;
        let defer = self.devices[dst].arena.committer().is_some();
        let (dst_id, pending) = self.place(dst, &spec, now, defer)?;
        if let Some(d) = self.records.get_mut(&dst_id) {
            d.busy = true;
            d.hidden = true;
        }
        if let Some(s) = self.records.get_mut(&id) {
            s.busy = true;
        }
        Ok((id, dst_id, size, pending))
    }

    /// Undoes [`AllocationEngine::begin_transfer`] whose destination pages could not be
    /// committed.
    pub fn abandon_transfer(&mut self, src_id: &Uuid, dst_id: &Uuid, pending: &DeferredCommit) {
        self.finish_deferred(dst_id, pending, false);
        if let Some(s) = self.records.get_mut(src_id) {
            s.busy = false;
        }
    }

    /// Copies `len` bytes at `offset` of a transfer's source into its destination.
    pub fn transfer_chunk(
        &mut self,
        src_id: &Uuid,
        dst_id: &Uuid,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        let gone = || EngineError::AllocationNotFound(src_id.to_string());
        let s = self.records.get(src_id).ok_or_else(gone)?;
        let d = self.records.get(dst_id).ok_or_else(gone)?;
        let (sd, dd) = (s.device as usize, d.device as usize);
        let (s_pool, d_pool) = (s.pool, d.pool);
        let (sp, dp) = (s.placement.ok_or_else(gone)?, d.placement.ok_or_else(gone)?);
        if sd == dd || offset + len > s.size {
            return Err(EngineError::InvalidTransfer("bad transfer chunk".into()));
        }
        let (so, doff) = (sp.offset() + offset, dp.offset() + offset);
        // Two devices of one Vec: borrow them apart.
        let (src_dev, dst_dev) = if sd < dd {
            let (a, b) = self.devices.split_at_mut(dd);
            (&a[sd], &mut b[0])
        } else {
            let (a, b) = self.devices.split_at_mut(sd);
            (&b[0], &mut a[dd])
        };
        let src_backend = src_dev.arena(s_pool).backend();
        let dst_backend = dst_dev.arena_mut(d_pool).backend_mut();
        // One side copies straight from or into the other's memory: both are guarded against
        // memory another process takes away meanwhile (an error then, never a signal).
        let (src_token, dst_token) = (src_backend.begin_access(), dst_backend.begin_access());
        let copied = if let Some(bytes) = src_backend.host_slice(so, len) {
            dst_backend.write(doff, bytes)
        } else if let Some(bytes) = dst_backend.host_slice_mut(doff, len) {
            src_backend.read(so, bytes)
        } else {
            let mut staging = vec![0u8; len as usize];
            src_backend
                .read(so, &mut staging)
                .and_then(|()| dst_backend.write(doff, &staging))
        };
        let src_ok = src_backend.end_access(src_token);
        let dst_ok = dst_backend.end_access(dst_token);
        copied.and(src_ok).and(dst_ok)?;
        Ok(())
    }

    /// Ends a transfer whose bytes are all copied. A move gives the source's id the
    /// destination's memory and frees the source's; a copy publishes the destination. Returns
    /// the destination's id.
    pub fn finish_transfer(
        &mut self,
        src_id: &Uuid,
        dst_id: &Uuid,
        copy: bool,
    ) -> Result<Uuid, EngineError> {
        let gone = || EngineError::AllocationNotFound(src_id.to_string());
        if copy {
            let d = self.records.get_mut(dst_id).ok_or_else(gone)?;
            d.busy = false;
            d.hidden = false;
            let (size, dst_device) = (d.size, d.device as usize);
            // Listed from now on: a state file written while it was hidden lacks it.
            if d.persistent && d.owner == Owner::Client {
                self.devices[dst_device].persistent_changes += 1;
            }
            if let Some(s) = self.records.get_mut(src_id) {
                s.busy = false;
                self.devices[s.device as usize].tally.transferred_out_bytes += size;
            }
            self.devices[dst_device].tally.transferred_in_bytes += size;
            return Ok(*dst_id);
        }
        let dst = self.records.remove(dst_id).ok_or_else(gone)?;
        let Some(src) = self.records.get_mut(src_id) else {
            // The source vanished (shutdown): give the destination back.
            self.release(dst);
            return Err(gone());
        };
        let old_device = src.device as usize;
        let old_placement = src.placement;
        let old_pool = src.pool;
        let recorded = src.persistent_client_on(old_device);
        // The destination device keeps its accounting (the memory stays); the source device
        // gives its bytes back as a deallocation, books as they were before the move.
        let dev = &mut self.devices[old_device];
        dev.unaccount(src);
        if let Some(p) = old_placement {
            dev.free_placement(&p, old_pool, recorded);
        }
        self.room.raise();
        dev.total_deallocations += 1;
        dev.tally.transferred_out_bytes += src.size;
        self.devices[dst.device as usize].tally.transferred_in_bytes += src.size;
        src.device = dst.device;
        src.placement = dst.placement;
        src.pool = dst.pool;
        src.purpose_slot = dst.purpose_slot;
        src.busy = false;
        // Listed on its new device from now on.
        if src.persistent && src.owner == Owner::Client {
            self.devices[dst.device as usize].persistent_changes += 1;
        }
        Ok(*src_id)
    }

    /// Moves an allocation (a model's too) to another device, keeping its id: the engine's own
    /// move, for offloading and restoring models. Copies under the caller's hold of the engine;
    /// on failure the allocation stays where it was.
    pub fn relocate(&mut self, id: &Uuid, dst: usize, now: SystemTime) -> Result<(), EngineError> {
        let gone = || EngineError::AllocationNotFound(id.to_string());
        let r = self.records.get(id).ok_or_else(gone)?;
        if r.device as usize == dst {
            return Ok(());
        }
        let spec = r.twin_spec();
        let size = r.size;
        let (dst_id, _) = self.place(dst, &spec, now, false)?;
        if let Some(d) = self.records.get_mut(&dst_id) {
            d.busy = true;
            d.hidden = true;
        }
        let mut done = 0;
        while done < size {
            let len = (256u64 << 20).min(size - done);
            if let Err(e) = self.transfer_chunk(id, &dst_id, done, len) {
                self.free_id(&dst_id);
                return Err(e);
            }
            done += len;
        }
        self.finish_transfer(id, &dst_id, false).map(|_| ())
    }

    /// Abandons a transfer: frees the destination, leaves the source as it was.
    pub fn abort_transfer(&mut self, src_id: &Uuid, dst_id: &Uuid) {
        if let Some(dst) = self.records.remove(dst_id) {
            self.release(dst);
        }
        if let Some(s) = self.records.get_mut(src_id) {
            s.busy = false;
        }
    }
}
