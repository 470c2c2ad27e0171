//! The Secret holding a pool's admin token, which guards the sidecars' `PUT /api/v1/tuning`.
//!
//! The operator generates the token once and keeps it; pods read it through a `secretKeyRef`, so
//! it never appears in the pod template.

use std::collections::BTreeMap;

use inferpool_crds::pool::InferencePool;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::{Owner, names};
use crate::Result;

/// Key of the token in the admin Secret.
pub const ADMIN_TOKEN_KEY: &str = "token";

/// The pool's admin Secret holding `token` under [`ADMIN_TOKEN_KEY`].
pub fn admin_secret(pool: &InferencePool, token: &str) -> Result<Secret> {
    let owner = Owner::of(pool)?;
    Ok(Secret {
        metadata: owner.meta(names::admin_secret(&owner.name)),
        type_: Some("Opaque".to_owned()),
        // `data`, not the write-only `stringData`: what is applied is what a read returns, so
        // server-side apply sees no difference on every reconcile.
        data: Some(BTreeMap::from([(ADMIN_TOKEN_KEY.to_owned(), ByteString(token.as_bytes().to_vec()))])),
        ..Secret::default()
    })
}
