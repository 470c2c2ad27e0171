//! Objects in memory, with the bookkeeping the Kubernetes API promises: one global, monotonic
//! `resourceVersion`; `uid` and `creationTimestamp` on create; `generation` bumped on spec changes
//! only; optimistic concurrency on replace; finalizers and `deletionTimestamp`; background garbage
//! collection through `ownerReferences` (background, foreground and orphan propagation); and a
//! history of changes that watches resume from. Custom resources are pruned, defaulted and
//! validated against their schema ([`super::schema`]) on every write, whatever its path.
//! [`Store::snapshot`] and [`Store::restore`] carry the objects and the resourceVersion counter
//! across restarts ([`super::persist`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::error::Status;
use super::persist::{RestoreError, Snapshot, Stored};
use super::resources::{self, Resource};
use super::schema;

/// Changes kept for watches to resume from; an older `resourceVersion` gets 410 Gone.
const HISTORY: usize = 4096;

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// Its resource type.
    pub resource: &'static Resource,
    /// Its namespace ("" for cluster-scoped objects).
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Gone.
    Deleted,
}

impl Change {
    /// The watch event type.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "ADDED",
            Change::Modified => "MODIFIED",
            Change::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Debug, Clone)]
pub struct Event {
    /// The resourceVersion of the change.
    pub rv: u64,
    /// What happened.
    pub change: Change,
    /// Which object.
    pub key: Key,
    /// The object after the change (before it, for a delete).
    pub object: Value,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
    uids: u64,
}

/// The object store.
pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<Event>>,
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The object (its status is kept when the resource has a status subresource).
    Main,
    /// Only `.status`.
    Status,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            inner: Mutex::new(Inner { rv: 1, objects: BTreeMap::new(), history: VecDeque::new(), uids: 0 }),
            events: broadcast::channel(HISTORY).0,
        }
    }
}

/// How a delete treats the objects that name the deleted one in their `ownerReferences`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    /// The owner goes at once; its dependents are deleted after it.
    #[default]
    Background,
    /// The owner gets `deletionTimestamp` and the `foregroundDeletion` finalizer and goes once
    /// its dependents with `blockOwnerDeletion` are gone; dependents are deleted first.
    Foreground,
    /// Dependents lose their reference to the owner and stay.
    Orphan,
}

/// The finalizer that holds an owner in foreground deletion.
const FOREGROUND: &str = "foregroundDeletion";

/// The current time in RFC 3339, as timestamps in objects carry it.
pub fn now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // RFC 3339 in UTC from unix seconds (civil-from-days, Howard Hinnant's algorithm).
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn meta(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// Prunes, defaults and validates an object of a resource with a schema: 422 when invalid.
fn admit(resource: &Resource, name: &str, mut object: Value) -> Result<Value, Status> {
    if resource.group.is_empty() && resource.kind == "Secret" {
        fold_string_data(&mut object);
    }
    let Some(schema) = resources::schema(resource) else { return Ok(object) };
    let causes = schema::admit(schema, &mut object);
    if causes.is_empty() { Ok(object) } else { Err(Status::invalid_causes(resource, name, &causes)) }
}

/// A Secret's write-only `stringData` is merged into `data` (base64) and never stored, as the
/// real API server does.
fn fold_string_data(secret: &mut Value) {
    use base64::Engine as _;
    let Some(Value::Object(strings)) = secret.as_object_mut().and_then(|o| o.remove("stringData")) else { return };
    let data = secret.as_object_mut().map(|o| o.entry("data").or_insert_with(|| json!({})));
    if let Some(Value::Object(data)) = data {
        for (key, value) in strings {
            let text = value.as_str().unwrap_or_default().to_owned();
            data.insert(key, Value::String(base64::engine::general_purpose::STANDARD.encode(text)));
        }
    }
}

fn uid_of(obj: &Value) -> &str {
    meta_str(obj, "uid").unwrap_or("")
}

fn owner_refs(obj: &Value) -> impl Iterator<Item = &Value> {
    obj.pointer("/metadata/ownerReferences").and_then(Value::as_array).into_iter().flatten()
}

fn owned_by(obj: &Value, uid: &str) -> bool {
    !uid.is_empty() && owner_refs(obj).any(|r| r.get("uid").and_then(Value::as_str) == Some(uid))
}

fn finalizers(obj: &Value) -> impl Iterator<Item = &str> {
    obj.pointer("/metadata/finalizers").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
}

fn resource_id(r: &Resource) -> String {
    format!("{}/{}/{}", r.group, r.version, r.plural)
}

impl Store {
    /// Watches live changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Records a change: new resourceVersion, history, broadcast. Returns the stored object.
    fn commit(&self, inner: &mut Inner, key: Key, change: Change, mut object: Value) -> Value {
        inner.rv += 1;
        let rv = inner.rv;
        meta(&mut object).insert("resourceVersion".into(), Value::String(rv.to_string()));
        if change == Change::Deleted {
            inner.objects.remove(&key);
        } else {
            inner.objects.insert(key.clone(), object.clone());
        }
        let event = Arc::new(Event { rv, change, key, object: object.clone() });
        if inner.history.len() == HISTORY {
            inner.history.pop_front();
        }
        inner.history.push_back(Arc::clone(&event));
        let _ = self.events.send(event);
        object
    }

    /// Creates an object; 409 when the name is taken.
    pub fn create(&self, resource: &'static Resource, namespace: &str, mut object: Value) -> Result<Value, Status> {
        let mut inner = self.lock();
        let name = match (meta_str(&object, "name"), meta_str(&object, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_owned(),
            (_, Some(prefix)) => format!("{prefix}{:05x}", inner.uids + 1),
            _ => return Err(Status::invalid(resource, "", "metadata.name", "name or generateName is required")),
        };
        let key = Key { resource, namespace: namespace.to_owned(), name: name.clone() };
        if inner.objects.contains_key(&key) {
            return Err(Status::already_exists(resource, &name));
        }
        inner.uids += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", inner.uids);
        object["apiVersion"] = Value::String(resource.api_version());
        object["kind"] = Value::String(resource.kind.to_owned());
        let m = meta(&mut object);
        m.insert("name".into(), Value::String(name));
        if resource.namespaced {
            m.insert("namespace".into(), Value::String(namespace.to_owned()));
        }
        m.insert("uid".into(), Value::String(uid));
        m.insert("creationTimestamp".into(), Value::String(now()));
        m.insert("generation".into(), json!(1));
        m.remove("deletionTimestamp");
        let object = admit(resource, &key.name, object)?;
        let owners: Vec<String> =
            owner_refs(&object).filter_map(|r| r.get("uid").and_then(Value::as_str)).map(str::to_owned).collect();
        let orphaned = !owners.is_empty() && !inner.objects.values().any(|v| owners.iter().any(|u| u == uid_of(v)));
        let object = self.commit(&mut inner, key.clone(), Change::Added, object);
        drop(inner);
        if orphaned {
            // Every owner is already gone (a client raced the owner's deletion): the garbage
            // collector removes such an object, as the real one does.
            let _ = self.delete_background(&key);
        }
        Ok(object)
    }

    /// The object at `key`.
    pub fn get(&self, key: &Key) -> Result<Value, Status> {
        self.lock().objects.get(key).cloned().ok_or_else(|| Status::not_found(key.resource, &key.name))
    }

    /// Objects of a resource (in one namespace or all) that `keep` accepts, and the current
    /// resourceVersion.
    pub fn list(
        &self,
        resource: &Resource,
        namespace: Option<&str>,
        keep: impl Fn(&Value) -> bool,
    ) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .iter()
            .filter(|(k, _)| *k.resource == *resource && namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, v)| v)
            .filter(|v| keep(v))
            .cloned()
            .collect();
        (items, inner.rv)
    }

    /// Changes after `rv` for watches to replay, or 410 Gone when they are no longer kept.
    pub fn since(&self, rv: u64) -> Result<Vec<Arc<Event>>, Status> {
        let inner = self.lock();
        let oldest = inner.history.front().map_or(inner.rv + 1, |e| e.rv);
        if rv + 1 < oldest && rv < inner.rv {
            return Err(Status::gone(rv));
        }
        Ok(inner.history.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    /// Replaces an object (or its status). `new` carries the whole object; a stale
    /// `metadata.resourceVersion` in it is a 409 Conflict, as is none for `require_rv`.
    pub fn replace(&self, key: &Key, part: Part, new: Value, require_rv: bool) -> Result<Value, Status> {
        let mut inner = self.lock();
        let old = inner.objects.get(key).cloned().ok_or_else(|| Status::not_found(key.resource, &key.name))?;
        match meta_str(&new, "resourceVersion") {
            Some(rv) if rv != meta_str(&old, "resourceVersion").unwrap_or("") => {
                return Err(Status::conflict(key.resource, &key.name));
            }
            None if require_rv => {
                return Err(Status::invalid(
                    key.resource,
                    &key.name,
                    "metadata.resourceVersion",
                    "must be specified for an update",
                ));
            }
            _ => {}
        }
        let merged = admit(key.resource, &key.name, merge_parts(key.resource, part, &old, new))?;
        if merged == old {
            return Ok(old);
        }
        let object = self.commit(&mut inner, key.clone(), Change::Modified, merged);
        drop(inner);
        self.finish_deletion_if_done(key);
        Ok(object)
    }

    /// Deletes an object with the background policy: at once, or by setting `deletionTimestamp`
    /// when finalizers remain. Dependents (by ownerReference uid) are deleted after it.
    pub fn delete(&self, key: &Key) -> Result<Value, Status> {
        self.delete_with(key, Propagation::Background)
    }

    /// Deletes an object, treating its dependents as `policy` says.
    pub fn delete_with(&self, key: &Key, policy: Propagation) -> Result<Value, Status> {
        match policy {
            Propagation::Background => self.delete_background(key),
            Propagation::Orphan => {
                let uid = uid_of(&self.get(key)?).to_owned();
                let mut inner = self.lock();
                let dependents = Self::dependents(&inner, &uid);
                for (k, mut dependent) in dependents {
                    if let Some(Value::Array(refs)) = dependent.pointer_mut("/metadata/ownerReferences") {
                        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid.as_str()));
                    }
                    self.commit(&mut inner, k, Change::Modified, dependent);
                }
                drop(inner);
                self.delete_background(key)
            }
            Propagation::Foreground => {
                let mut inner = self.lock();
                let mut old =
                    inner.objects.get(key).cloned().ok_or_else(|| Status::not_found(key.resource, &key.name))?;
                if finalizers(&old).any(|f| f == FOREGROUND) {
                    return Ok(old);
                }
                let m = meta(&mut old);
                if !m.contains_key("deletionTimestamp") {
                    m.insert("deletionTimestamp".into(), Value::String(now()));
                }
                match m.get_mut("finalizers") {
                    Some(Value::Array(f)) => f.push(json!(FOREGROUND)),
                    _ => {
                        m.insert("finalizers".into(), json!([FOREGROUND]));
                    }
                }
                let uid = uid_of(&old).to_owned();
                let pending = self.commit(&mut inner, key.clone(), Change::Modified, old);
                let dependents = Self::dependents(&inner, &uid);
                drop(inner);
                for (k, _) in dependents {
                    let _ = self.delete_background(&k);
                }
                self.settle_foreground(key);
                Ok(self.get(key).unwrap_or(pending))
            }
        }
    }

    /// The objects owned by `uid`.
    fn dependents(inner: &Inner, uid: &str) -> Vec<(Key, Value)> {
        inner.objects.iter().filter(|(_, v)| owned_by(v, uid)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Deletes a pod at once, without its graceful termination: what the kubelet does once the
    /// pod's containers have stopped (a DELETE with `gracePeriodSeconds: 0`).
    pub fn delete_now(&self, key: &Key) -> Result<Value, Status> {
        self.delete_background_with(key, false)
    }

    fn delete_background(&self, key: &Key) -> Result<Value, Status> {
        self.delete_background_with(key, true)
    }

    fn delete_background_with(&self, key: &Key, graceful: bool) -> Result<Value, Status> {
        let mut inner = self.lock();
        let mut old = inner.objects.get(key).cloned().ok_or_else(|| Status::not_found(key.resource, &key.name))?;
        // A pod bound to a node terminates gracefully, as in Kubernetes: the API server only marks
        // it (deletionTimestamp, deletionGracePeriodSeconds) and the node's kubelet stops its
        // containers, then deletes it for good. An unbound pod goes at once.
        if graceful && key.resource.kind == "Pod" && old.pointer("/spec/nodeName").is_some_and(|n| n != "") {
            if meta_str(&old, "deletionTimestamp").is_some() {
                return Ok(old);
            }
            let grace = old.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_u64).unwrap_or(30);
            let m = meta(&mut old);
            m.insert("deletionTimestamp".into(), Value::String(now()));
            m.insert("deletionGracePeriodSeconds".into(), json!(grace));
            return Ok(self.commit(&mut inner, key.clone(), Change::Modified, old));
        }
        if finalizers(&old).next().is_some() {
            if meta_str(&old, "deletionTimestamp").is_some() {
                return Ok(old);
            }
            meta(&mut old).insert("deletionTimestamp".into(), Value::String(now()));
            return Ok(self.commit(&mut inner, key.clone(), Change::Modified, old));
        }
        let uid = uid_of(&old).to_owned();
        let owner_uids: Vec<String> =
            owner_refs(&old).filter_map(|r| r.get("uid").and_then(Value::as_str)).map(str::to_owned).collect();
        let gone = self.commit(&mut inner, key.clone(), Change::Deleted, old);
        let dependents = Self::dependents(&inner, &uid);
        // Owners waiting in foreground deletion for this dependent may go now.
        let owners: Vec<Key> = inner
            .objects
            .iter()
            .filter(|(_, v)| owner_uids.iter().any(|u| u == uid_of(v)) && finalizers(v).any(|f| f == FOREGROUND))
            .map(|(k, _)| k.clone())
            .collect();
        drop(inner);
        for (dependent, _) in dependents {
            let _ = self.delete_background(&dependent);
        }
        for owner in owners {
            self.settle_foreground(&owner);
        }
        Ok(gone)
    }

    /// Ends a foreground deletion once no dependent with `blockOwnerDeletion` is left.
    fn settle_foreground(&self, key: &Key) {
        let mut inner = self.lock();
        let Some(mut owner) = inner.objects.get(key).cloned() else { return };
        let uid = uid_of(&owner).to_owned();
        let blocked = inner.objects.values().any(|v| {
            owner_refs(v).any(|r| {
                r.get("uid").and_then(Value::as_str) == Some(uid.as_str())
                    && r.get("blockOwnerDeletion").and_then(Value::as_bool) == Some(true)
            })
        });
        if blocked || !finalizers(&owner).any(|f| f == FOREGROUND) {
            return;
        }
        if let Some(Value::Array(f)) = owner.pointer_mut("/metadata/finalizers") {
            f.retain(|f| f != FOREGROUND);
        }
        self.commit(&mut inner, key.clone(), Change::Modified, owner);
        drop(inner);
        self.finish_deletion_if_done(key);
    }

    /// Every object and the counters, for [`Store::restore`].
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        let objects = inner
            .objects
            .iter()
            .map(|(k, v)| Stored {
                resource: resource_id(k.resource),
                namespace: k.namespace.clone(),
                name: k.name.clone(),
                object: v.clone(),
            })
            .collect();
        Snapshot { resource_version: inner.rv, uids: inner.uids, objects }
    }

    /// Replaces everything with a snapshot's objects and counters; watch history starts empty,
    /// so a watch from an older resourceVersion gets 410 and re-lists.
    pub fn restore(&self, snapshot: Snapshot) -> Result<(), RestoreError> {
        let mut objects = BTreeMap::new();
        for s in snapshot.objects {
            let mut parts = s.resource.splitn(3, '/');
            let (g, v, p) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let resource = resources::find(g, v, p).ok_or_else(|| RestoreError::new(&s.resource, &s.name))?;
            objects.insert(Key { resource, namespace: s.namespace, name: s.name }, s.object);
        }
        let mut inner = self.lock();
        inner.objects = objects;
        inner.rv = snapshot.resource_version;
        inner.uids = snapshot.uids;
        inner.history.clear();
        Ok(())
    }

    /// Removes an object being deleted once its last finalizer is gone.
    fn finish_deletion_if_done(&self, key: &Key) {
        let done =
            self.get(key).is_ok_and(|o| meta_str(&o, "deletionTimestamp").is_some() && finalizers(&o).next().is_none());
        if done {
            let _ = self.delete(key);
        }
    }
}

/// The stored object after a write of `part`: system metadata always from the old object; the
/// status from the old object on main writes to a resource with a status subresource, and only
/// the status from the new one on status writes; `generation` bumped when the spec changed.
fn merge_parts(resource: &Resource, part: Part, old: &Value, new: Value) -> Value {
    let mut out = match part {
        Part::Status => {
            let mut o = old.clone();
            o["status"] = new.get("status").cloned().unwrap_or(Value::Null);
            // Field ownership of a status write comes with it.
            if let Some(managed) = new.pointer("/metadata/managedFields") {
                meta(&mut o).insert("managedFields".into(), managed.clone());
            }
            return keep_system_metadata(old, o);
        }
        Part::Main => new,
    };
    if resource.status {
        match old.get("status") {
            Some(s) => out["status"] = s.clone(),
            None => {
                if let Some(o) = out.as_object_mut() {
                    o.remove("status");
                }
            }
        }
    }
    let mut out = keep_system_metadata(old, out);
    let generation = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
    let spec_changed = old.get("spec") != out.get("spec");
    meta(&mut out).insert("generation".into(), json!(if spec_changed { generation + 1 } else { generation }));
    out
}

fn keep_system_metadata(old: &Value, mut new: Value) -> Value {
    new["apiVersion"] = old["apiVersion"].clone();
    new["kind"] = old["kind"].clone();
    let m = meta(&mut new);
    for field in ["name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "resourceVersion", "generation"]
    {
        match old.pointer(&format!("/metadata/{field}")) {
            Some(v) => m.insert(field.into(), v.clone()),
            None => m.remove(field),
        };
    }
    new
}
