//! Objects in memory, with the bookkeeping the Kubernetes API promises: one global, monotonic
//! `resourceVersion`; `uid` and `creationTimestamp` on create; `generation` bumped on spec changes
//! only; optimistic concurrency on replace; finalizers and `deletionTimestamp`; background garbage
//! collection through `ownerReferences`; and a history of changes that watches resume from.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::error::Status;
use super::resources::Resource;

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

fn now() -> String {
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

impl Store {
    /// Watches live changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
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
        Ok(self.commit(&mut inner, key, Change::Added, object))
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
        let merged = merge_parts(key.resource, part, &old, new);
        if merged == old {
            return Ok(old);
        }
        let object = self.commit(&mut inner, key.clone(), Change::Modified, merged);
        drop(inner);
        self.finish_deletion_if_done(key);
        Ok(object)
    }

    /// Deletes an object: at once, or by setting `deletionTimestamp` when finalizers remain.
    /// Dependents (by ownerReference uid) are deleted too, as the background policy does.
    pub fn delete(&self, key: &Key) -> Result<Value, Status> {
        let mut inner = self.lock();
        let mut old = inner.objects.get(key).cloned().ok_or_else(|| Status::not_found(key.resource, &key.name))?;
        let finalizers = old.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty());
        if finalizers {
            if meta_str(&old, "deletionTimestamp").is_some() {
                return Ok(old);
            }
            meta(&mut old).insert("deletionTimestamp".into(), Value::String(now()));
            return Ok(self.commit(&mut inner, key.clone(), Change::Modified, old));
        }
        let uid = meta_str(&old, "uid").unwrap_or_default().to_owned();
        let gone = self.commit(&mut inner, key.clone(), Change::Deleted, old);
        let dependents: Vec<Key> = inner
            .objects
            .iter()
            .filter(|(_, v)| {
                v.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| refs.iter().any(|r| r.get("uid").and_then(Value::as_str) == Some(uid.as_str())))
            })
            .map(|(k, _)| k.clone())
            .collect();
        drop(inner);
        for dependent in dependents {
            let _ = self.delete(&dependent);
        }
        Ok(gone)
    }

    /// Removes an object being deleted once its last finalizer is gone.
    fn finish_deletion_if_done(&self, key: &Key) {
        let done = self.get(key).is_ok_and(|o| {
            meta_str(&o, "deletionTimestamp").is_some()
                && o.pointer("/metadata/finalizers").and_then(Value::as_array).is_none_or(|f| f.is_empty())
        });
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
