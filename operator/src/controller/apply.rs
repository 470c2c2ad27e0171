//! Writing a pool's children, reading what is there from the reflector stores.
//!
//! Each child is server-side applied with the operator's field manager, except when the desired
//! object is the one applied last time (same digest) and the store shows the child as that apply
//! left it: same resourceVersion, or, for kinds with a `metadata.generation`, the same generation,
//! labels, annotations and owners (a Deployment's status moves its resourceVersion on every
//! rollout step without changing what the operator wrote). Such an apply would change nothing, so
//! it is not sent: a reconcile of an unchanged pool costs the API server no request, and one of a
//! changed pool sends only the children that change.
//!
//! The Event wording ("Created", "Updated", nothing) compares the store's resourceVersion before
//! the apply with the one the apply returns. Because the store may not have seen the operator's
//! own previous write yet, the resourceVersion that write returned counts as "before" too.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferpool_crds::InferencePool;
use inferpool_crds::pool::InferencePoolStatus;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::Context;
use crate::autoscale::decisions::PoolRef;
use crate::build::{self, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::events::event;

/// How long the admin Secret is trusted to exist after it was last seen.
const SECRET_RECHECK: Duration = Duration::from_secs(300);

/// What the operator wrote for each pool, to skip applies that would change nothing.
#[derive(Debug, Default)]
pub struct Written {
    pools: Mutex<HashMap<PoolRef, PoolWrites>>,
}

/// The operator's last writes for one pool (reset when a pool of the same name is recreated).
#[derive(Debug, Default)]
struct PoolWrites {
    uid: Option<String>,
    children: HashMap<Cow<'static, str>, Applied>,
    secret_seen: Option<Instant>,
    /// The status last written, and when.
    status: Option<(Instant, InferencePoolStatus)>,
}

/// How long a status write is trusted over a pool object that may predate it.
const STATUS_FRESH: Duration = Duration::from_secs(10);

/// One child as the operator's last apply left it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Applied {
    /// Digest of the desired object that was applied.
    digest: [u8; 32],
    /// The child's resourceVersion after the apply.
    resource_version: String,
    /// The child's generation after the apply, for kinds that have one.
    generation: Option<i64>,
    /// Digest of the child's labels, annotations and owners after the apply.
    metadata: [u8; 32],
}

impl Applied {
    fn of<K: Resource>(object: &K, digest: [u8; 32]) -> Result<Self> {
        let meta = object.meta();
        Ok(Self {
            digest,
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            generation: meta.generation,
            metadata: metadata_digest(object)?,
        })
    }

    /// Whether `stored` is the child as this apply left it, as far as the operator wrote it.
    fn left_as_is<K: Resource>(&self, stored: &K) -> Result<bool> {
        let meta = stored.meta();
        if meta.resource_version.as_ref() == Some(&self.resource_version) {
            return Ok(true);
        }
        Ok(self.generation.is_some() && meta.generation == self.generation && metadata_digest(stored)? == self.metadata)
    }
}

fn digest(value: &impl Serialize) -> Result<[u8; 32]> {
    let bytes = serde_json::to_vec(value).map_err(|e| Error::Serialize("a child", e))?;
    Ok(Sha256::digest(bytes).into())
}

fn metadata_digest<K: Resource>(object: &K) -> Result<[u8; 32]> {
    let meta = object.meta();
    digest(&(&meta.labels, &meta.annotations, &meta.owner_references))
}

impl Written {
    fn with<T>(&self, pool: &InferencePool, f: impl FnOnce(&mut PoolWrites) -> T) -> T {
        let mut pools = self.pools.lock();
        let writes = pools.entry(PoolRef::from_obj(pool)).or_default();
        if writes.uid != pool.metadata.uid {
            *writes = PoolWrites { uid: pool.metadata.uid.clone(), ..PoolWrites::default() };
        }
        f(writes)
    }

    /// Whether `status` is, but for the conditions' transition times, what this operator wrote
    /// for the pool in the last [`STATUS_FRESH`]. A reconcile that started from a pool object
    /// older than that write would otherwise write the same status again.
    pub(super) fn status_just_written(&self, pool: &InferencePool, status: &InferencePoolStatus) -> bool {
        let timeless = |status: &InferencePoolStatus| {
            let mut status = status.clone();
            for condition in &mut status.conditions {
                condition.last_transition_time = Time(Timestamp::UNIX_EPOCH);
            }
            status
        };
        self.with(pool, |w| {
            w.status
                .as_ref()
                .is_some_and(|(at, written)| at.elapsed() < STATUS_FRESH && timeless(written) == timeless(status))
        })
    }

    /// Remembers a status write.
    pub(super) fn status_written(&self, pool: &InferencePool, status: InferencePoolStatus) {
        self.with(pool, |w| w.status = Some((Instant::now(), status)));
    }

    /// Forgets the pools `keep` says no to.
    pub fn retain(&self, keep: impl Fn(&PoolRef) -> bool) {
        self.pools.lock().retain(|pool, _| keep(pool));
    }
}

/// Outcome of applying one child, for Events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Created,
    Updated,
    Unchanged,
}

/// Applies `child` unless the store shows it as the operator's last apply of the same object left
/// it; publishes an Event when it was created or changed. Returns the child as it now is.
pub async fn apply<K>(ctx: &Context, pool: &InferencePool, store: &Store<K>, child: &K) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let namespace = pool.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let name = child.meta().name.clone().unwrap_or_default();
    let kind: Cow<'static, str> = K::kind(&());
    let stored: Option<Arc<K>> = store.get(&ObjectRef::new(&name).within(&namespace));
    let stored_rv = stored.as_ref().and_then(|o| o.meta().resource_version.clone());
    let desired = digest(child)?;
    let last = ctx.written.with(pool, |w| w.children.get(&kind).cloned());
    if let (Some(stored), Some(last)) = (&stored, &last)
        && last.digest == desired
        && last.left_as_is(stored.as_ref())?
    {
        return Ok(K::clone(stored));
    }

    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let after = api.patch(&name, &params, &Patch::Apply(child)).await?;
    let written = Applied::of(&after, desired)?;
    let after_rv = &written.resource_version;
    let outcome =
        if stored_rv.as_ref() == Some(after_rv) || last.as_ref().is_some_and(|l| l.resource_version == *after_rv) {
            Outcome::Unchanged
        } else if stored.is_none() && last.is_none() {
            Outcome::Created
        } else {
            Outcome::Updated
        };
    ctx.written.with(pool, |w| w.children.insert(kind.clone(), written));
    if outcome != Outcome::Unchanged {
        let verb = if outcome == Outcome::Created { "Created" } else { "Updated" };
        tracing::info!(%kind, %name, "{}", verb.to_lowercase());
        let note = format!("{verb} {kind} {name}");
        ctx.publish(pool, event(EventType::Normal, verb, "Apply", note, Some(after.object_ref(&())))).await;
    }
    Ok(after)
}

/// Creates the pool's admin-token Secret when it is missing. The token is derived from the
/// operator's admin key and the pool (see [`build::AdminKey`]), so the operator never reads the
/// Secret: a create that finds one already there (409) is taken as done, and the Secret is never
/// rewritten. The operator does not watch Secrets either (that would need list and watch on every
/// Secret it can see): it creates once per pool and again at most every [`SECRET_RECHECK`], which
/// brings back a Secret someone deleted.
pub async fn ensure_admin_secret(ctx: &Context, pool: &InferencePool, namespace: &str) -> Result<()> {
    let seen = ctx.written.with(pool, |w| w.secret_seen);
    if seen.is_some_and(|at| at.elapsed() < SECRET_RECHECK) {
        return Ok(());
    }
    let name = pool.name_any();
    let uid = pool.uid().ok_or(Error::MissingMetadata("uid"))?;
    let secret = build::admin_secret(pool, &ctx.admin_key.token(namespace, &name, &uid))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let params = PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..Default::default() };
    match secrets.create(&params, &secret).await {
        Ok(created) => {
            let note = format!("Created Secret {}", build::names::admin_secret(&name));
            let related = Some(created.object_ref(&()));
            ctx.publish(pool, event(EventType::Normal, "Created", "Apply", note, related)).await;
        }
        // There already: made by an earlier reconcile (or another operator replica).
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(error.into()),
    }
    ctx.written.with(pool, |w| w.secret_seen = Some(Instant::now()));
    Ok(())
}
