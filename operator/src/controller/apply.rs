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
//! The store may also still show the child as it was just before that apply (its watch event has
//! not arrived yet when the next reconcile starts). That object is older than the operator's write,
//! not a change by someone else (anyone else's write would carry a new resourceVersion), so it
//! does not make the operator apply the same object again.
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
    /// The resourceVersion the store showed when the apply was sent (none: not in the store).
    replaced: Option<String>,
    /// The child's generation after the apply, for kinds that have one.
    generation: Option<i64>,
    /// Digest of the child's labels, annotations and owners after the apply.
    metadata: [u8; 32],
    /// The child the apply returned, for a reconcile whose store has not caught up with it.
    object: Arc<serde_json::Value>,
}

impl Applied {
    fn of<K: Resource + Serialize>(object: &K, digest: [u8; 32], replaced: Option<String>) -> Result<Self> {
        let meta = object.meta();
        Ok(Self {
            digest,
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            replaced,
            generation: meta.generation,
            metadata: metadata_digest(object)?,
            object: Arc::new(serde_json::to_value(object).map_err(|e| Error::Serialize("a child", e))?),
        })
    }

    /// What `stored` is to this apply.
    fn compare<K: Resource>(&self, stored: &K) -> Result<Seen> {
        let meta = stored.meta();
        let rv = meta.resource_version.as_ref();
        if rv == Some(&self.resource_version) {
            return Ok(Seen::AsLeft);
        }
        if rv.is_some() && rv == self.replaced.as_ref() {
            return Ok(Seen::Before);
        }
        let kept = self.generation.is_some()
            && meta.generation == self.generation
            && metadata_digest(stored)? == self.metadata;
        Ok(if kept { Seen::AsLeft } else { Seen::Changed })
    }
}

/// What the store shows of a child, compared with the operator's last apply of it.
enum Seen {
    /// The child as that apply left it, as far as the operator wrote it.
    AsLeft,
    /// The object that apply replaced: the store has not seen the apply yet.
    Before,
    /// Something else: a later change, or a child the store saw deleted and made again.
    Changed,
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
    {
        match last.compare(stored.as_ref())? {
            Seen::AsLeft => return Ok(K::clone(stored)),
            Seen::Before => {
                let object = K::deserialize(last.object.as_ref()).map_err(|e| Error::Serialize("a child", e))?;
                return Ok(object);
            }
            Seen::Changed => {}
        }
    }

    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let after = api.patch(&name, &params, &Patch::Apply(child)).await?;
    let written = Applied::of(&after, desired, stored_rv.clone())?;
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    use super::*;

    fn meta(rv: &str, generation: Option<i64>, label: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some("pool".into()),
            resource_version: Some(rv.into()),
            generation,
            labels: Some([("app".to_owned(), label.to_owned())].into()),
            ..ObjectMeta::default()
        }
    }

    fn seen<K: Resource + Serialize>(applied: &K, replaced: Option<&str>, stored: &K) -> &'static str {
        let last = Applied::of(applied, [7; 32], replaced.map(str::to_owned)).unwrap();
        match last.compare(stored).unwrap() {
            Seen::AsLeft => "as left",
            Seen::Before => "before",
            Seen::Changed => "changed",
        }
    }

    #[test]
    fn a_store_behind_the_last_apply_is_told_from_a_change() {
        let map = |rv, label| ConfigMap { metadata: meta(rv, None, label), ..ConfigMap::default() };
        let deployment =
            |rv, generation, label| Deployment { metadata: meta(rv, generation, label), ..Deployment::default() };
        let applied = deployment("12", Some(2), "a");
        type Case = (&'static str, Option<&'static str>, Deployment, &'static str);
        let cases: [Case; 5] = [
            ("the store shows the apply's result", Some("10"), deployment("12", Some(2), "a"), "as left"),
            (
                "a status write since (same generation and metadata)",
                Some("10"),
                deployment("15", Some(2), "a"),
                "as left",
            ),
            ("the store still shows what the apply replaced", Some("10"), deployment("10", Some(1), "a"), "before"),
            ("someone changed the spec since", Some("10"), deployment("15", Some(3), "a"), "changed"),
            ("someone changed a label since", Some("10"), deployment("15", Some(2), "b"), "changed"),
        ];
        for (case, replaced, stored, want) in cases {
            assert_eq!(seen(&applied, replaced, &stored), want, "{case}");
        }
        // Kinds without a generation: only resourceVersions tell.
        let applied = map("12", "a");
        assert_eq!(seen(&applied, Some("10"), &map("12", "a")), "as left");
        assert_eq!(seen(&applied, Some("10"), &map("10", "a")), "before");
        assert_eq!(seen(&applied, Some("10"), &map("15", "a")), "changed");
        // A create replaced nothing: an object in the store that is not the apply's is a change.
        assert_eq!(seen(&applied, None, &map("10", "a")), "changed");
    }
}
