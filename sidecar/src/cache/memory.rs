//! L1: embeddings in process memory, in `quick_cache`.
//!
//! quick_cache was chosen over moka and foyer's memory tier because it alone can change its
//! capacity at run time (`set_capacity`) while keeping its hot entries: it is a CLOCK-Pro/S3-FIFO
//! style cache whose shrink evicts from the cold queue first, so the operator's tuning and the
//! memory-pressure guard can resize L1 without a restart and without throwing away what is being
//! hit. It is also small (three dependencies) and lock-sharded, with lookups that take a shard's
//! read lock only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Key;

/// Bytes an entry costs beyond its values: key, Arc header and the cache's slot (an estimate).
const ENTRY_OVERHEAD: u64 = 96;

/// The in-memory tier: key -> embedding, capacity in entries.
pub struct MemoryTier {
    cache: quick_cache::sync::Cache<Key, Arc<[f32]>>,
    capacity: AtomicU64,
}

impl MemoryTier {
    /// A tier holding up to `capacity` entries (0 disables it until resized).
    pub fn new(capacity: u64) -> Self {
        // Start with room for at least one entry per shard, then apply the real capacity, so a
        // later grow from 0 has shards to grow into.
        let cache = quick_cache::sync::Cache::new(capacity.max(64) as usize);
        cache.set_capacity(capacity);
        MemoryTier { cache, capacity: AtomicU64::new(capacity) }
    }

    /// The embedding for `key`, if held.
    pub fn get(&self, key: &Key) -> Option<Arc<[f32]>> {
        self.cache.get(key)
    }

    /// Stores an embedding (no-op while the capacity is 0).
    pub fn insert(&self, key: Key, value: Arc<[f32]>) {
        if self.capacity() > 0 {
            self.cache.insert(key, value);
        }
    }

    /// Changes the capacity; shrinking evicts cold entries first. Each shard rounds its share up,
    /// so the tier may hold up to one entry per shard more than `capacity`.
    pub fn resize(&self, capacity: u64) {
        self.capacity.store(capacity, Ordering::Relaxed);
        self.cache.set_capacity(capacity);
        if capacity == 0 {
            self.cache.clear();
        }
    }

    /// Removes every entry; returns how many there were.
    pub fn clear(&self) -> u64 {
        let n = self.cache.len() as u64;
        self.cache.clear();
        n
    }

    /// Capacity in force, in entries.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Entries held.
    pub fn len(&self) -> u64 {
        self.cache.len() as u64
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Estimated bytes held for embeddings of `dim` values.
    pub fn bytes(&self, dim: usize) -> u64 {
        self.len() * (dim as u64 * 4 + ENTRY_OVERHEAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> Key {
        Key::of("m", &i.to_le_bytes())
    }

    fn value(i: u32) -> Arc<[f32]> {
        Arc::from(vec![i as f32; 4])
    }

    #[test]
    fn holds_up_to_capacity() {
        let m = MemoryTier::new(100);
        for i in 0..1000 {
            m.insert(key(i), value(i));
        }
        assert!(m.len() <= 100 + m.cache.num_shards() as u64, "{}", m.len());
        assert_eq!(m.get(&key(999)).as_deref(), Some(&[999.0; 4][..]));
    }

    #[test]
    fn shrinking_keeps_hot_entries() {
        let m = MemoryTier::new(1000);
        for i in 0..1000 {
            m.insert(key(i), value(i));
        }
        // Keys 0..10 are read again and again; the rest once.
        for _ in 0..5 {
            for i in 0..10 {
                assert!(m.get(&key(i)).is_some());
            }
        }
        m.resize(100);
        // Each shard rounds its share of the capacity up.
        assert!(m.len() <= 100 + m.cache.num_shards() as u64, "{}", m.len());
        let kept = (0..10).filter(|&i| m.get(&key(i)).is_some()).count();
        assert_eq!(kept, 10, "hot entries lost in the shrink");
        m.resize(1000);
        assert_eq!(m.capacity(), 1000);
    }

    #[test]
    fn zero_capacity_holds_nothing_and_can_grow() {
        let m = MemoryTier::new(0);
        m.insert(key(1), value(1));
        assert!(m.get(&key(1)).is_none());
        m.resize(10);
        m.insert(key(1), value(1));
        assert!(m.get(&key(1)).is_some());
        m.resize(0);
        assert!(m.is_empty());
    }
}
