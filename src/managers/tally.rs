//! Running totals of a device's live allocations, kept as they come and go so that reports and
//! metrics never walk the allocations: bytes and counts by type, by purpose, of persistent and
//! reclaimable ones, and counters since the start.

use crate::domain::MemoryAllocationType;
use rustc_hash::FxHashMap;

/// The number of allocation types.
pub const TYPE_COUNT: usize = 7;

/// What the tally needs to know of an allocation.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Bytes.
    pub size: u64,
    /// Type.
    pub kind: MemoryAllocationType,
    /// Label.
    pub purpose: &'a str,
    /// Persistent.
    pub persistent: bool,
    /// Made by a client (not a model's weights).
    pub client: bool,
}

/// Live bytes and counts of one purpose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurposeTotal {
    /// Live allocations.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Live allocations of one purpose.
#[derive(Debug)]
struct PurposeSlot {
    name: Box<str>,
    total: PurposeTotal,
}

/// A device's running totals. Memory grows with the number of distinct purposes of live
/// allocations (an entry goes when its last allocation does), never with requests served.
///
/// Purposes are interned: an allocation keeps the slot of its purpose (returned by
/// [`Tally::add`]), so freeing it is an index, not a hash lookup, and adding one with the same
/// purpose as the last skips the hash too. (A hash lookup per free and per allocation cost
/// 200–400 ns per pair on the H200 host's Xeon, against about 200 ns for the whole pair
/// otherwise.)
#[derive(Debug, Default)]
pub struct Tally {
    /// Live bytes by type (Reservations included), indexed by the type's value.
    pub bytes_by_type: [u64; TYPE_COUNT],
    /// Live allocations by type.
    pub live_by_type: [u64; TYPE_COUNT],
    /// Allocations made since the start, by type.
    pub total_by_type: [u64; TYPE_COUNT],
    /// Live bytes of client allocations that `memory.optimize` may free without force, by
    /// type (not persistent).
    pub reclaimable_client_bytes: [u64; TYPE_COUNT],
    /// Live persistent client allocations.
    pub persistent_client_count: u64,
    /// Bytes transferred onto this device since the start.
    pub transferred_in_bytes: u64,
    /// Bytes transferred off this device since the start.
    pub transferred_out_bytes: u64,
    slots: Vec<Option<PurposeSlot>>,
    free_slots: Vec<u32>,
    by_name: FxHashMap<Box<str>, u32>,
    last: Option<u32>,
    /// Slots whose purpose has no live allocation now, kept for its next allocation.
    empty: usize,
}

/// Empty purpose slots kept before they are swept. A purpose whose last allocation goes keeps
/// its slot, so an allocate/free cycle of one purpose (the common case: one live allocation of
/// a purpose at a time) does not create and drop a slot, its two name copies and its map entry
/// on every cycle; past this many empty slots they are all dropped at once, so memory stays
/// bounded by the purposes of live allocations plus this.
const KEPT_EMPTY_SLOTS: usize = 256;

/// `a == b` for purposes, without calling the C library for the empty purpose (the default,
/// and most allocations'). `str`'s `==` calls `bcmp` for a length known only at run time, even a
/// length of 0 with the dangling pointers of empty strings; on the H200 host's Xeon that call
/// cost about 90 ns, a third of an allocate + free (engine bench pairs, side by side on one
/// core: 230–260 ns with it, 141–163 ns without). The same call on a 16-byte purpose showed no
/// such cost (160–190 ns before and after), so other lengths go through `==`.
fn same_purpose(a: &str, b: &str) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}

impl Tally {
    fn purpose_slot(&mut self, purpose: &str) -> u32 {
        if let Some(l) = self.last
            && let Some(Some(slot)) = self.slots.get(l as usize)
            && same_purpose(&slot.name, purpose)
        {
            return l;
        }
        let index = match self.by_name.get(purpose) {
            Some(&i) => i,
            None => {
                let slot = PurposeSlot {
                    name: purpose.into(),
                    total: PurposeTotal::default(),
                };
                let i = match self.free_slots.pop() {
                    Some(i) => {
                        self.slots[i as usize] = Some(slot);
                        i
                    }
                    None => {
                        self.slots.push(Some(slot));
                        (self.slots.len() - 1) as u32
                    }
                };
                self.by_name.insert(purpose.into(), i);
                // Empty until `add` counts its allocation.
                self.empty += 1;
                i
            }
        };
        self.last = Some(index);
        index
    }

    /// An allocation went live; returns its purpose's slot, for [`Tally::remove`].
    pub fn add(&mut self, e: Entry<'_>) -> u32 {
        let t = e.kind.value() as usize % TYPE_COUNT;
        self.bytes_by_type[t] += e.size;
        self.live_by_type[t] += 1;
        self.total_by_type[t] += 1;
        if e.client {
            if e.persistent {
                self.persistent_client_count += 1;
            } else {
                self.reclaimable_client_bytes[t] += e.size;
            }
        }
        let index = self.purpose_slot(e.purpose);
        if let Some(Some(slot)) = self.slots.get_mut(index as usize) {
            if slot.total.count == 0 {
                self.empty = self.empty.saturating_sub(1);
            }
            slot.total.count += 1;
            slot.total.bytes += e.size;
        }
        index
    }

    /// An allocation added before (its purpose at `slot`) is gone: freed, or moved away.
    pub fn remove(&mut self, e: Entry<'_>, slot: u32) {
        let t = e.kind.value() as usize % TYPE_COUNT;
        self.bytes_by_type[t] = self.bytes_by_type[t].saturating_sub(e.size);
        self.live_by_type[t] = self.live_by_type[t].saturating_sub(1);
        if e.client {
            if e.persistent {
                self.persistent_client_count = self.persistent_client_count.saturating_sub(1);
            } else {
                self.reclaimable_client_bytes[t] =
                    self.reclaimable_client_bytes[t].saturating_sub(e.size);
            }
        }
        let emptied = match self.slots.get_mut(slot as usize) {
            Some(Some(s)) if s.total.count > 0 => {
                s.total.count -= 1;
                s.total.bytes = s.total.bytes.saturating_sub(e.size);
                s.total.count == 0
            }
            _ => false,
        };
        if emptied {
            self.empty += 1;
            if self.empty > KEPT_EMPTY_SLOTS {
                self.sweep_empty();
            }
        }
    }

    /// Drops every slot whose purpose has no live allocation.
    fn sweep_empty(&mut self) {
        for (i, entry) in self.slots.iter_mut().enumerate() {
            if entry.as_ref().is_some_and(|s| s.total.count == 0)
                && let Some(s) = entry.take()
            {
                self.by_name.remove(&s.name);
                self.free_slots.push(i as u32);
                if self.last == Some(i as u32) {
                    self.last = None;
                }
            }
        }
        self.empty = 0;
    }

    /// An allocation made since the start was undone (its pages were refused).
    pub fn uncount(&mut self, kind: MemoryAllocationType) {
        let t = kind.value() as usize % TYPE_COUNT;
        self.total_by_type[t] = self.total_by_type[t].saturating_sub(1);
    }

    /// Live bytes of a type.
    pub fn bytes(&self, kind: MemoryAllocationType) -> u64 {
        self.bytes_by_type[kind.value() as usize % TYPE_COUNT]
    }

    /// Live bytes by purpose: the `limit` largest, and the rest summed under `rest_label`
    /// (only when there are more than `limit`).
    pub fn bytes_by_purpose(&self, limit: usize, rest_label: &str) -> Vec<(String, u64)> {
        let mut all: Vec<(&str, u64)> = self
            .slots
            .iter()
            .flatten()
            .filter(|s| s.total.count > 0)
            .map(|s| (s.name.as_ref(), s.total.bytes))
            .collect();
        if all.len() > limit {
            all.select_nth_unstable_by(limit, |a, b| b.1.cmp(&a.1));
            let rest: u64 = all[limit..].iter().map(|(_, b)| b).sum();
            all.truncate(limit);
            // A purpose that happens to be named like the rest joins it (keys stay unique).
            match all.iter_mut().find(|(k, _)| *k == rest_label) {
                Some((_, b)) => *b += rest,
                None => all.push((rest_label, rest)),
            }
        }
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        all.into_iter().map(|(k, b)| (k.to_string(), b)).collect()
    }

    /// Distinct purposes of live allocations.
    pub fn purpose_count(&self) -> usize {
        self.by_name.len() - self.empty
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemoryAllocationType as T;

    fn e(size: u64, kind: T, purpose: &str, persistent: bool) -> Entry<'_> {
        Entry {
            size,
            kind,
            purpose,
            persistent,
            client: true,
        }
    }

    #[test]
    fn adds_and_removes_exactly() {
        let mut t = Tally::default();
        let a1 = t.add(e(10, T::Cache, "a", false));
        let a2 = t.add(e(20, T::Cache, "a", true));
        let b = t.add(e(5, T::General, "b", false));
        assert_eq!(a1, a2, "one slot per purpose");
        assert_ne!(a1, b);
        assert_eq!(t.bytes(T::Cache), 30);
        assert_eq!(t.reclaimable_client_bytes[T::Cache.value() as usize], 10);
        assert_eq!(t.persistent_client_count, 1);
        assert_eq!(
            t.bytes_by_purpose(10, "…"),
            vec![("a".to_string(), 30), ("b".to_string(), 5)]
        );
        t.remove(e(20, T::Cache, "a", true), a2);
        t.remove(e(10, T::Cache, "a", false), a1);
        assert_eq!(t.bytes(T::Cache), 0);
        assert_eq!(
            t.purpose_count(),
            1,
            "a purpose goes with its last allocation"
        );
        assert_eq!(t.total_by_type[T::Cache.value() as usize], 2);
        assert_eq!(t.bytes_by_purpose(10, "…"), vec![("b".to_string(), 5)]);
        // The emptied slot serves the purpose's next allocation.
        assert_eq!(t.add(e(7, T::Cache, "a", false)), a1);
        assert_eq!(t.purpose_count(), 2);
    }

    #[test]
    fn empty_purpose_slots_are_bounded() {
        let mut t = Tally::default();
        let keep = t.add(e(1, T::General, "kept", false));
        for i in 0..10 * KEPT_EMPTY_SLOTS {
            let s = t.add(e(3, T::General, &format!("p{i}"), false));
            t.remove(e(3, T::General, &format!("p{i}"), false), s);
            assert!(t.empty <= KEPT_EMPTY_SLOTS);
        }
        assert!(t.slots.len() <= KEPT_EMPTY_SLOTS + 2, "{}", t.slots.len());
        assert_eq!(t.purpose_count(), 1);
        assert_eq!(t.bytes_by_purpose(10, "…"), vec![("kept".to_string(), 1)]);
        t.remove(e(1, T::General, "kept", false), keep);
        assert_eq!(t.purpose_count(), 0);
    }

    #[test]
    fn purposes_compare_like_strings() {
        let words = [
            "",
            "a",
            "b",
            "ab",
            "unet_act",
            "unet_acts",
            "unet_activations",
            "unet_activationz",
            "é",
            "e",
        ];
        for x in words {
            for y in words {
                assert_eq!(same_purpose(x, y), x == y, "{x:?} {y:?}");
            }
        }
    }

    #[test]
    fn purposes_beyond_the_limit_are_summed() {
        let mut t = Tally::default();
        for i in 0..5u64 {
            t.add(e(i + 1, T::General, &format!("p{i}"), false));
        }
        let v = t.bytes_by_purpose(2, "(other)");
        assert_eq!(
            v,
            vec![
                ("(other)".to_string(), 6),
                ("p4".to_string(), 5),
                ("p3".to_string(), 4)
            ]
        );
    }
}
