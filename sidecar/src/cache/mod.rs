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
        hex::encode(self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Key> {
        let mut k = [0u8; KEY_LEN];
        hex::decode_to_slice(s, &mut k).ok()?;
        Some(Key(k))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", &self.hex()[..16])
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
