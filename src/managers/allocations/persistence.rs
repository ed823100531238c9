//! Persistence: what a state file records, memory held until a state file drops it, adoption
//! of an earlier worker's allocations, and release at shutdown.

use super::*;

impl AllocationEngine {
    /// The key that turns record slots into ids (saved with persistent state, so a later
    /// worker can adopt the same ids).
    pub fn id_key(&self) -> u32 {
        self.records.key()
    }

    /// Sets the id key; only before any allocation exists.
    pub fn set_id_key(&mut self, key: u32) -> bool {
        self.records.set_key(key)
    }

    /// How many times a persistent client allocation came or went on a device.
    pub fn persistent_changes(&self, device: usize) -> u64 {
        self.devices[device].persistent_changes
    }

    /// The file another process maps a device's memory through, if it has one.
    pub fn handle_path(&self, device: usize) -> Option<std::path::PathBuf> {
        self.devices[device]
            .arena
            .backend()
            .handle(0)
            .map(|h| std::path::PathBuf::from(h.path))
    }

    /// Records a device's persistent allocations in a state file from now on: the memory of
    /// one that is freed or moved away is held until [`AllocationEngine::release_held`] says
    /// a state file without it is written.
    pub fn set_durable(&mut self, device: usize) {
        self.devices[device].durable = true;
    }

    /// A state file of `generation` (a [`AllocationEngine::persistent_changes`] figure) is
    /// written: gives back the memory of the persistent allocations it no longer lists.
    /// Returns the bytes.
    pub fn release_held(&mut self, device: usize, generation: u64) -> u64 {
        let dev = &mut self.devices[device];
        let mut released = 0;
        let mut kept = Vec::new();
        for (g, p) in std::mem::take(&mut dev.held) {
            if g <= generation {
                released += p.block_bytes();
                dev.arena.free(&p);
            } else {
                kept.push((g, p));
            }
        }
        dev.held = kept;
        if released > 0 {
            self.room.raise();
        }
        released
    }

    /// A device's persistent client allocations as they would be adopted later.
    pub fn persistent_state(&self, device: usize) -> Vec<Adopted> {
        let mut v: Vec<Adopted> = self
            .records
            .iter()
            .filter(|r| r.persistent_client_on(device) && !r.pool)
            .filter_map(|r| {
                r.placement.map(|p| Adopted {
                    id: r.id,
                    offset: p.offset(),
                    spec: r.twin_spec(),
                    created_us: r.created_us,
                })
            })
            .collect();
        v.sort_by_key(|a| a.offset);
        v
    }

    /// A device's persistent client allocations made before `before`, largest first, at most
    /// `limit`: (id, bytes, made at). Walks the allocations only when the device has some.
    pub fn persistent_allocations(
        &self,
        device: usize,
        before: SystemTime,
        limit: usize,
    ) -> Vec<(Uuid, u64, SystemTime)> {
        if self.devices[device].tally.persistent_client_count == 0 {
            return Vec::new();
        }
        let cut = micros(before);
        let mut v: Vec<(Uuid, u64, SystemTime)> = self
            .records
            .iter()
            .filter(|r| r.persistent_client_on(device) && !r.busy && r.created_us < cut)
            .map(|r| {
                (
                    r.id,
                    r.size,
                    UNIX_EPOCH + Duration::from_micros(r.created_us),
                )
            })
            .collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
        v.truncate(limit);
        v
    }

    /// Takes over persistent allocations an earlier worker left on a device (which must have
    /// none yet): same ids, offsets and bytes. Everything else in the device's memory is given
    /// back. A failure adopts nothing.
    pub fn adopt(&mut self, device: usize, items: Vec<Adopted>) -> Result<usize, EngineError> {
        let dev = &mut self.devices[device];
        if dev.live > 0 {
            return Err(EngineError::OutOfRange(
                "adopting allocations needs an empty device".into(),
            ));
        }
        let total: u64 = items.iter().map(|a| a.spec.size).sum();
        if total > dev.budget {
            return Err(EngineError::OverBudget {
                device: dev.arena.backend().device_id().to_string(),
                requested: total,
                budget: dev.budget,
            });
        }
        let ranges: Vec<(u64, u64, u64)> = items
            .iter()
            .map(|a| (a.offset, a.spec.size, a.spec.alignment))
            .collect();
        let placements = dev.arena.adopt(&ranges).map_err(EngineError::OutOfRange)?;
        let n = items.len();
        for (a, placement) in items.into_iter().zip(placements) {
            let dev = &mut self.devices[device];
            dev.allocated += a.spec.size;
            dev.live += 1;
            dev.total_allocations += 1;
            dev.note_peaks();
            // It counts against the tenant that made it, as when it was made.
            dev.tenant_add(&a.spec.holder.tenant, a.spec.size);
            let purpose_slot = dev.tally.add(Entry {
                size: a.spec.size,
                kind: a.spec.kind,
                purpose: &a.spec.purpose,
                persistent: true,
                client: true,
            });
            let record = Record {
                id: a.id,
                size: a.spec.size,
                seq: self.next_seq,
                created_us: a.created_us,
                placement: Some(placement),
                purpose: a.spec.purpose.as_str().into(),
                owner: Owner::Client,
                holder: Arc::clone(&a.spec.holder),
                device: device as u16,
                kind: a.spec.kind,
                persistent: true,
                reservation_align_log2: 0,
                busy: false,
                hidden: false,
                pool: false,
                purpose_slot,
            };
            self.next_seq += 1;
            if self.records.adopt(record).is_err() {
                return Err(EngineError::OutOfRange(format!(
                    "allocation id {} cannot be adopted (its slot is taken)",
                    a.id
                )));
            }
        }
        self.devices[device].note_charged();
        Ok(n)
    }

    /// Frees every allocation except the persistent client ones of `keep` (a device whose
    /// persistent allocations outlive the worker).
    pub fn release_all_but_persistent(&mut self, keep: usize) -> u64 {
        let ids: Vec<Uuid> = self
            .records
            .iter()
            .filter(|r| {
                !(r.device as usize == keep && r.persistent && r.owner == Owner::Client && !r.busy)
            })
            .map(|r| r.id)
            .collect();
        let n = ids.len() as u64;
        for id in ids {
            self.free_id(&id);
        }
        n
    }

    /// Frees every allocation on every device (shutdown).
    pub fn release_all(&mut self) -> u64 {
        let records: Vec<Record> = self.records.drain();
        let n = records.len() as u64;
        for r in records {
            self.release(r);
        }
        n
    }

    /// Like [`AllocationEngine::close`], but the persistent client allocations of `keep` are
    /// left in its memory untouched (their pages are not given back) for a later worker.
    /// Every other page of `keep` is given back first (the file holds only what a later worker
    /// adopts), and with no persistent allocation left the file itself goes.
    pub fn close_keeping_persistent(&mut self, keep: usize) {
        self.release_all_but_persistent(keep);
        let dev = &mut self.devices[keep];
        if dev.held.is_empty() {
            dev.arena.trim();
            if dev.live == 0 {
                dev.arena.backend_mut().keep_file(false);
            }
        }
        self.records.drain();
        self.devices.clear();
    }

    /// Frees everything and drops every device (unmapping it, removing files).
    pub fn close(&mut self) {
        self.release_all();
        self.devices.clear();
    }
}
