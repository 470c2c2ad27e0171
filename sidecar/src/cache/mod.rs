//! The three-tier embedding cache: memory (L1), disk (L2) and Redis (L3).
//!
//! A request's image bytes and the model fingerprint hash to a [`Key`]; an embedding found in a
//! lower tier is promoted to the tiers above it, and one computed by the model is written to every
//! tier off the request's path.

pub mod breaker;
pub mod coalesce;
pub mod codec;
pub mod disk;
pub mod memory;
pub mod pressure;
pub mod redis;
pub mod tiers;

pub use tiers::{Cache, CacheConfig, Hit};

use std::fmt;

/// Bytes in a cache key.
pub const KEY_LEN: usize = 32;

/// A cache key: blake3 of the model fingerprint and the image bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; KEY_LEN]);

impl Key {
    /// The key of `image` under the model named by `fingerprint`. The fingerprint is hashed first
    /// with its length, so no fingerprint/image split can collide with another.
    pub fn of(fingerprint: &str, image: &[u8]) -> Key {
        let mut h = blake3::Hasher::new();
        h.update(&(fingerprint.len() as u64).to_le_bytes());
        h.update(fingerprint.as_bytes());
        h.update(image);
        Key(*h.finalize().as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Key> {
        if s.len() != 2 * KEY_LEN || !s.is_ascii() {
            return None;
        }
        let mut k = [0u8; KEY_LEN];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Key(k))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", &self.hex()[..16])
    }
}

/// A cache tier, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// L1: in-process memory.
    Memory,
    /// L2: the local disk.
    Disk,
    /// L3: Redis, shared by the replicas of a pool.
    Redis,
}

impl Tier {
    /// Every tier, top first.
    pub const ALL: [Tier; 3] = [Tier::Memory, Tier::Disk, Tier::Redis];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Redis => "redis",
        }
    }
}

/// Why a tier failed, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A stored entry failed its checksum or format check; it was dropped.
    Corrupt,
    /// The tier did not answer within its timeout.
    Timeout,
    /// The tier could not be reached.
    Connection,
    /// A local read or write failed.
    Io,
    /// A write was dropped because the write-behind queue was full.
    Dropped,
    /// The tier answered something unexpected.
    Protocol,
}

impl ErrorKind {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection",
            ErrorKind::Io => "io",
            ErrorKind::Dropped => "dropped",
            ErrorKind::Protocol => "protocol",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_model_and_bytes() {
        let a = Key::of("m@1", b"image");
        assert_eq!(a, Key::of("m@1", b"image"));
        assert_ne!(a, Key::of("m@2", b"image"));
        assert_ne!(a, Key::of("m@1", b"imagf"));
        // Moving bytes between the fingerprint and the image changes the key.
        assert_ne!(Key::of("m@1i", b"mage"), a);
        assert_eq!(Key::from_hex(&a.hex()), Some(a));
        assert_eq!(Key::from_hex("zz"), None);
    }
}
