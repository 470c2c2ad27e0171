//! The Secret holding a pool's admin token, which guards the sidecars' `PUT /api/v1/tuning`, and
//! the key the token is derived from.
//!
//! The token is a keyed BLAKE3 hash of the pool's namespace, name and uid under the operator's
//! [`AdminKey`], so the operator computes it whenever it pushes tuning instead of reading the
//! Secret back: it needs `create` on Secrets and nothing more (no `get`, no cluster-wide read).
//! Pods read the token through a `secretKeyRef`, so it never appears in the pod template. A pool
//! deleted and created again under the same name gets a new uid, hence a new token.

use std::collections::BTreeMap;
use std::fmt;

use inferpool_crds::pool::InferencePool;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::{Owner, names};
use crate::Result;

/// Key of the token in the admin Secret.
pub const ADMIN_TOKEN_KEY: &str = "token";

/// Fewest bytes of key material accepted: 128 bits.
pub const MIN_KEY_BYTES: usize = 16;

/// BLAKE3 key-derivation context: changing it changes every token.
const CONTEXT: &str = "inferpool.dev 2026 pool admin token v1";

/// The secret the operator derives every pool's admin token from (`--admin-key-file`).
#[derive(Clone)]
pub struct AdminKey([u8; 32]);

/// Why key material was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the admin key has {0} bytes (after trailing newlines are removed); it needs at least {MIN_KEY_BYTES}")]
pub struct ShortKey(pub usize);

impl AdminKey {
    /// A key from material such as a mounted Secret's file: trailing newlines are not part of it,
    /// and anything shorter than [`MIN_KEY_BYTES`] is refused.
    pub fn from_material(material: &[u8]) -> std::result::Result<Self, ShortKey> {
        let end = material.iter().rposition(|b| !matches!(b, b'\n' | b'\r')).map_or(0, |i| i + 1);
        let material = &material[..end];
        if material.len() < MIN_KEY_BYTES {
            return Err(ShortKey(material.len()));
        }
        Ok(Self(blake3::derive_key(CONTEXT, material)))
    }

    /// The admin token of the pool `namespace/name` with `uid`, as 64 hex digits.
    pub fn token(&self, namespace: &str, name: &str, uid: &str) -> String {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        // Lengths first, so no split of the three strings collides with another.
        for part in [namespace, name, uid] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        hasher.finalize().to_hex().to_string()
    }
}

impl fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminKey(***)")
    }
}

/// The pool's admin Secret holding `token` under [`ADMIN_TOKEN_KEY`].
pub fn admin_secret(pool: &InferencePool, token: &str) -> Result<Secret> {
    let owner = Owner::of(pool)?;
    Ok(Secret {
        metadata: owner.meta(names::admin_secret(&owner.name)),
        type_: Some("Opaque".to_owned()),
        // `data`, not the write-only `stringData`: what is created is what a read returns.
        data: Some(BTreeMap::from([(ADMIN_TOKEN_KEY.to_owned(), ByteString(token.as_bytes().to_vec()))])),
        ..Secret::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(material: &str) -> AdminKey {
        AdminKey::from_material(material.as_bytes()).expect("long enough")
    }

    #[test]
    fn tokens_differ_by_key_pool_and_uid_and_are_stable() {
        let a = key("0123456789abcdef0123");
        let base = a.token("prod", "shop", "u-1");
        assert_eq!(base.len(), 64);
        assert!(base.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(base, a.token("prod", "shop", "u-1"));
        // A newline at the end of a mounted file is not part of the key.
        assert_eq!(base, key("0123456789abcdef0123\n").token("prod", "shop", "u-1"));
        let others = [
            key("0123456789abcdef0124").token("prod", "shop", "u-1"),
            a.token("prod", "shop", "u-2"),
            a.token("prod", "news", "u-1"),
            a.token("dev", "shop", "u-1"),
            // Moving characters between the parts changes the token.
            a.token("prods", "hop", "u-1"),
        ];
        for other in others {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn short_or_empty_material_is_refused_and_the_key_is_never_shown() {
        for (material, len) in [("", 0), ("\n", 0), ("short", 5), ("fifteen-bytes!!\r\n", 15)] {
            assert_eq!(AdminKey::from_material(material.as_bytes()).unwrap_err(), ShortKey(len), "{material:?}");
        }
        let shown = format!("{:?}", key("0123456789abcdef-secret"));
        assert!(!shown.contains("secret") && shown.contains("***"), "{shown}");
    }
}
