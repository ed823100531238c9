//! The table of live allocations: a slab indexed by a slot number that the allocation's own
//! UUID carries, so a lookup is one array access and one comparison, with no hash table.
//!
//! Ids stay UUID v4 in form (version and variant bits untouched, 90 random bits): only their
//! first 32 bits carry the slot, whitened with a per-table random key so that ids do not look
//! sequential. A reused slot gets fresh random bits, so an old id never finds a new allocation.
//! Why not a `HashMap<Uuid, _>`: with a million live allocations its probing misses the cache
//! on every operation and its capacity doubling costs up to twice the memory per entry.

use uuid::Uuid;

/// Anything stored in the table knows its id.
pub trait HasId {
    /// The allocation id.
    fn id(&self) -> &Uuid;
}

/// A slab of records keyed by the UUIDs it mints.
pub struct RecordTable<R> {
    slots: Vec<Option<R>>,
    free: Vec<u32>,
    key: u32,
    len: usize,
}

impl<R: HasId> RecordTable<R> {
    /// An empty table.
    pub fn new() -> Self {
        RecordTable {
            slots: Vec::new(),
            free: Vec::new(),
            key: (Uuid::new_v4().as_u128() as u32),
            len: 0,
        }
    }

    /// Mints the id the next inserted record must carry, and the slot it goes to.
    pub fn next_id(&mut self) -> (Uuid, u32) {
        let slot = match self.free.last() {
            Some(&s) => s,
            None => self.slots.len() as u32,
        };
        let mut bytes = *Uuid::new_v4().as_bytes();
        bytes[..4].copy_from_slice(&(slot ^ self.key).to_le_bytes());
        (Uuid::from_bytes(bytes), slot)
    }

    /// Stores a record under the slot `next_id` returned (the record carries that id).
    pub fn insert(&mut self, slot: u32, record: R) {
        if self.free.last() == Some(&slot) {
            self.free.pop();
            self.slots[slot as usize] = Some(record);
        } else {
            debug_assert_eq!(slot as usize, self.slots.len());
            self.slots.push(Some(record));
        }
        self.len += 1;
    }

    fn slot_of(&self, id: &Uuid) -> usize {
        let b = id.as_bytes();
        (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) ^ self.key) as usize
    }

    /// The record with this id.
    pub fn get(&self, id: &Uuid) -> Option<&R> {
        self.slots
            .get(self.slot_of(id))?
            .as_ref()
            .filter(|r| r.id() == id)
    }

    /// The record with this id, mutably.
    pub fn get_mut(&mut self, id: &Uuid) -> Option<&mut R> {
        let slot = self.slot_of(id);
        self.slots.get_mut(slot)?.as_mut().filter(|r| r.id() == id)
    }

    /// Removes and returns the record with this id.
    pub fn remove(&mut self, id: &Uuid) -> Option<R> {
        let slot = self.slot_of(id);
        let cell = self.slots.get_mut(slot)?;
        if cell.as_ref().is_some_and(|r| r.id() == id) {
            self.free.push(slot as u32);
            self.len -= 1;
            cell.take()
        } else {
            None
        }
    }

    /// Live records, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = &R> {
        self.slots.iter().filter_map(Option::as_ref)
    }

    /// Live records, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut R> {
        self.slots.iter_mut().filter_map(Option::as_mut)
    }

    /// Removes every record.
    pub fn drain(&mut self) -> Vec<R> {
        self.free.clear();
        self.len = 0;
        self.slots.drain(..).flatten().collect()
    }

    /// The key that whitens slots into ids (kept across restarts to adopt old ids).
    pub fn key(&self) -> u32 {
        self.key
    }

    /// Sets the key, on an empty table only (returns whether it was set).
    pub fn set_key(&mut self, key: u32) -> bool {
        if self.len > 0 {
            return false;
        }
        self.key = key;
        true
    }

    /// Stores a record under the id it already has (one minted by a table with the same key,
    /// in an earlier process). Fails when that slot is taken.
    pub fn adopt(&mut self, record: R) -> Result<(), R> {
        let slot = self.slot_of(record.id());
        if slot > u32::MAX as usize / 2 {
            return Err(record);
        }
        while self.slots.len() <= slot {
            self.free.push(self.slots.len() as u32);
            self.slots.push(None);
        }
        if self.slots[slot].is_some() {
            return Err(record);
        }
        self.free.retain(|&s| s as usize != slot);
        self.slots[slot] = Some(record);
        self.len += 1;
        Ok(())
    }

    /// Live records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Option<R>>() + self.free.capacity() * 4
    }
}

impl<R: HasId> Default for RecordTable<R> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rec(Uuid, u32);
    impl HasId for Rec {
        fn id(&self) -> &Uuid {
            &self.0
        }
    }

    #[test]
    fn ids_are_v4_and_find_their_records() {
        let mut t = RecordTable::new();
        let mut ids = Vec::new();
        for i in 0..100 {
            let (id, slot) = t.next_id();
            assert_eq!(id.get_version_num(), 4);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            t.insert(slot, Rec(id, i));
            ids.push(id);
        }
        assert_eq!(t.get(&ids[42]).unwrap().1, 42);
        let old = ids[7];
        assert_eq!(t.remove(&old).unwrap().1, 7);
        assert!(t.get(&old).is_none());
        let (new, slot) = t.next_id();
        t.insert(slot, Rec(new, 1000));
        assert!(
            t.get(&old).is_none(),
            "a reused slot does not answer to the old id"
        );
        assert_eq!(t.get(&new).unwrap().1, 1000);
        assert!(t.get(&Uuid::new_v4()).is_none());
        assert_eq!(t.len(), 100);
    }
}
