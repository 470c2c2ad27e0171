//! Server-side apply: which field manager owns which fields, kept in `metadata.managedFields` in
//! the Kubernetes shape (`manager`, `operation` Apply or Update, `apiVersion`, `time`,
//! `fieldsType: FieldsV1`, `fieldsV1`, and `subresource` for status writes).
//!
//! Simplified from the real structured-merge-diff: a manager owns a set of leaf paths (maps are
//! walked, lists are atomic and owned whole, an empty map is a leaf); `fieldsV1` is the tree of
//! `f:<key>` entries those paths make. The HTTP layer computes the object a write produces here,
//! with pure functions, and hands it to the store.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::error::Cause;

/// A field as the keys from the object's root, e.g. `["spec", "replicas"]`.
pub type FieldPath = Vec<String>;

/// Which part of an object a write may touch, for ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The object; `status` is left out when the resource has a status subresource.
    Main {
        /// Whether `status` is a separate subresource.
        status_separate: bool,
    },
    /// Only `status` (a write to `/status`).
    Status,
}

/// One manager's entry.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    manager: String,
    apply: bool,
    api_version: String,
    time: String,
    status: bool,
    fields: BTreeSet<FieldPath>,
}

/// Who writes, and how.
#[derive(Debug, Clone)]
pub struct Writer<'a> {
    /// The field manager.
    pub manager: &'a str,
    /// `apiVersion` the writer used.
    pub api_version: &'a str,
    /// The write's time (RFC 3339).
    pub time: &'a str,
    /// Where it writes.
    pub scope: Scope,
}

impl Writer<'_> {
    fn owns(&self, e: &Entry, apply: bool) -> bool {
        e.manager == self.manager && e.apply == apply && e.status == (self.scope == Scope::Status)
    }

    fn entry(&self, apply: bool) -> Entry {
        Entry {
            manager: self.manager.to_owned(),
            apply,
            api_version: self.api_version.to_owned(),
            time: self.time.to_owned(),
            status: self.scope == Scope::Status,
            fields: BTreeSet::new(),
        }
    }
}

fn related(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn set(v: &mut Value, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut cursor = v;
    for k in parents {
        if !cursor.get(k).is_some_and(Value::is_object) {
            cursor[k.as_str()] = json!({});
        }
        cursor = &mut cursor[k.as_str()];
    }
    if value.as_object().is_some_and(Map::is_empty) && cursor.get(last).is_some_and(Value::is_object) {
        return; // An empty map sets nothing over an existing one.
    }
    cursor[last.as_str()] = value;
}

/// Removes the field at `path`, and then each parent object the removal left empty (the manager
/// owned the parent through its children, as a real API server's fieldsV1 records it).
fn remove(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    if let Some(Value::Object(parent)) = parents.iter().try_fold(&mut *v, |v, k| v.get_mut(k)) {
        parent.remove(last);
        // Top-level parts (metadata, spec, status) stay even when empty.
        if parent.is_empty() && parents.len() > 1 {
            remove(v, parents);
        }
    }
}

fn walk(v: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                path.push(k.clone());
                walk(child, path, out);
                path.pop();
            }
        }
        // An explicit null sets nothing.
        Value::Null => {}
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The leaf paths `object` sets within `scope`: system metadata is nobody's; of `metadata`, only
/// labels, annotations, finalizers and ownerReferences are.
pub fn leaves(object: &Value, scope: Scope) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    let Some(root) = object.as_object() else { return out };
    for (k, v) in root {
        let wanted = match (k.as_str(), scope) {
            ("apiVersion" | "kind", _) => false,
            ("status", Scope::Status) => true,
            (_, Scope::Status) => false,
            ("status", Scope::Main { status_separate }) => !status_separate,
            _ => true,
        };
        if !wanted {
            continue;
        }
        if k == "metadata" {
            for field in ["labels", "annotations", "finalizers", "ownerReferences"] {
                if let Some(v) = v.get(field) {
                    walk(v, &mut vec![k.clone(), field.to_owned()], &mut out);
                }
            }
        } else {
            walk(v, &mut vec![k.clone()], &mut out);
        }
    }
    out
}

fn decode(tree: &Value, path: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    let children: Vec<_> = tree
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.strip_prefix("f:")?.to_owned(), v)))
        .collect();
    if children.is_empty() {
        if !path.is_empty() {
            out.insert(path.clone());
        }
        return;
    }
    for (k, v) in children {
        path.push(k);
        decode(v, path, out);
        path.pop();
    }
}

fn encode(fields: &BTreeSet<FieldPath>) -> Value {
    let mut tree = json!({});
    for path in fields {
        let keyed: Vec<String> = path.iter().map(|k| format!("f:{k}")).collect();
        set(&mut tree, &keyed, json!({}));
    }
    tree
}

fn read(object: Option<&Value>) -> Vec<Entry> {
    let entries = object.and_then(|o| o.pointer("/metadata/managedFields")).and_then(Value::as_array);
    entries
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            let mut fields = BTreeSet::new();
            decode(e.get("fieldsV1")?, &mut Vec::new(), &mut fields);
            Some(Entry {
                manager: text("manager"),
                apply: text("operation") == "Apply",
                api_version: text("apiVersion"),
                time: text("time"),
                status: text("subresource") == "status",
                fields,
            })
        })
        .collect()
}

/// Stores `entries` in `object`, after dropping fields the object no longer has and entries left
/// with no fields.
fn write(object: &mut Value, mut entries: Vec<Entry>) {
    for e in &mut entries {
        e.fields.retain(|p| get(object, p).is_some());
    }
    entries.retain(|e| !e.fields.is_empty());
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": if e.apply { "Apply" } else { "Update" },
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": encode(&e.fields),
            });
            if e.status {
                v["subresource"] = json!("status");
            }
            v
        })
        .collect();
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"]["managedFields"] = Value::Array(list);
}

/// A field another manager owns, with a different value than the apply sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The owner.
    pub manager: String,
    /// The `apiVersion` it wrote with.
    pub api_version: String,
    /// The field, e.g. `.spec.replicas`.
    pub field: String,
}

impl Conflict {
    /// The `FieldManagerConflict` cause of a 409.
    pub fn cause(&self) -> Cause {
        let message = format!("conflict with \"{}\" using {}", self.manager, self.api_version);
        Cause::new("FieldManagerConflict", &self.field, message)
    }
}

/// The message of a 409 for `conflicts`, worded like the API server's.
pub fn conflict_message(conflicts: &[Conflict]) -> String {
    let n = conflicts.len();
    let head = format!("Apply failed with {n} conflict{}", if n == 1 { "" } else { "s" });
    match conflicts {
        [c] => format!("{head}: conflict with \"{}\" using {}: {}", c.manager, c.api_version, c.field),
        _ => {
            let lines: Vec<String> = conflicts
                .iter()
                .map(|c| format!("conflict with \"{}\" using {}: {}", c.manager, c.api_version, c.field))
                .collect();
            format!("{head}: {}", lines.join("; "))
        }
    }
}

/// The object a server-side apply of `body` by `writer` makes from `current` (None: the object
/// is created), or the conflicts when `force` is off. Fields the manager applied before and now
/// omits are removed unless another manager owns them too.
pub fn apply(current: Option<&Value>, body: &Value, writer: &Writer, force: bool) -> Result<Value, Vec<Conflict>> {
    let mut entries = read(current);
    let wanted = leaves(body, writer.scope);
    let empty = json!({});
    let base = current.unwrap_or(&empty);
    let mut conflicts = Vec::new();
    for p in &wanted {
        let (new, old) = (get(body, p), get(base, p));
        if old.is_none() || new == old || new.and_then(Value::as_object).is_some_and(Map::is_empty) {
            continue;
        }
        for e in entries.iter().filter(|e| e.manager != writer.manager) {
            if e.fields.iter().any(|q| related(p, q)) {
                let field = format!(".{}", p.join("."));
                conflicts.push(Conflict { manager: e.manager.clone(), api_version: e.api_version.clone(), field });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    // Forced: the others lose what this apply sets.
    for e in entries.iter_mut().filter(|e| e.manager != writer.manager) {
        e.fields.retain(|q| !wanted.iter().any(|p| related(p, q) && get(body, p) != get(base, p)));
    }
    let before: BTreeSet<FieldPath> =
        entries.iter().filter(|e| writer.owns(e, true)).flat_map(|e| e.fields.iter().cloned()).collect();
    let mut out = base.clone();
    for p in before.difference(&wanted) {
        let shared = entries.iter().any(|e| !writer.owns(e, true) && e.fields.iter().any(|q| related(p, q)));
        if !shared {
            remove(&mut out, p);
        }
    }
    for p in &wanted {
        if let Some(v) = get(body, p) {
            set(&mut out, p, v.clone());
        }
    }
    let previous = entries.iter().find(|e| writer.owns(e, true)).map(|e| (e.fields.clone(), e.time.clone()));
    let unchanged = out == *base;
    entries.retain(|e| !writer.owns(e, true));
    let mut mine = writer.entry(true);
    // A no-op apply changes nothing, its entry's time included, so it writes nothing at all.
    if let Some((fields, time)) = previous.filter(|(fields, _)| unchanged && *fields == wanted) {
        mine.time = time;
        mine.fields = fields;
    } else {
        mine.fields = wanted;
    }
    entries.push(mine);
    write(&mut out, entries);
    Ok(out)
}

/// Records a non-apply write (create, update, patch) by `writer`: it takes over every field it
/// set or changed from `old` (None for a create) to `new`, and `new` gets the result.
pub fn update(old: Option<&Value>, new: &mut Value, writer: &Writer) {
    let mut entries = read(old);
    let empty = json!({});
    let base = old.unwrap_or(&empty);
    let changed: BTreeSet<FieldPath> =
        leaves(new, writer.scope).into_iter().filter(|p| get(base, p) != get(new, p)).collect();
    if changed.is_empty() && old.is_some() {
        write(new, entries);
        return;
    }
    for e in entries.iter_mut().filter(|e| !writer.owns(e, false)) {
        e.fields.retain(|q| !changed.iter().any(|p| related(p, q)));
    }
    match entries.iter_mut().find(|e| writer.owns(e, false)) {
        Some(e) => {
            e.fields.extend(changed);
            e.time = writer.time.to_owned();
        }
        None => {
            let mut e = writer.entry(false);
            e.fields = changed;
            entries.push(e);
        }
    }
    write(new, entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            api_version: "apps/v1",
            time: "2026-01-01T00:00:00Z",
            scope: Scope::Main { status_separate: true },
        }
    }

    fn owners(object: &Value) -> Vec<(String, String)> {
        read(Some(object)).iter().flat_map(|e| e.fields.iter().map(|f| (e.manager.clone(), f.join(".")))).collect()
    }

    #[test]
    fn managers_share_conflict_and_take_over() {
        let a = json!({"spec": {"replicas": 1, "x": [1, 2]}, "metadata": {"labels": {"l": "1"}}});
        let obj = apply(None, &a, &writer("a"), false).unwrap();
        assert_eq!(
            owners(&obj),
            [("a", "metadata.labels.l"), ("a", "spec.replicas"), ("a", "spec.x")].map(|(m, f)| (m.into(), f.into()))
        );
        // Same value: shared, no conflict.
        let obj = apply(Some(&obj), &json!({"spec": {"replicas": 1}}), &writer("b"), false).unwrap();
        let err = apply(Some(&obj), &json!({"spec": {"replicas": 2}}), &writer("b"), false).unwrap_err();
        assert_eq!(
            err,
            [Conflict { manager: "a".into(), api_version: "apps/v1".into(), field: ".spec.replicas".into() }]
        );
        assert_eq!(
            conflict_message(&err),
            "Apply failed with 1 conflict: conflict with \"a\" using apps/v1: .spec.replicas"
        );
        let forced = apply(Some(&obj), &json!({"spec": {"replicas": 2}}), &writer("b"), true).unwrap();
        assert_eq!(forced["spec"]["replicas"], 2);
        assert!(!owners(&forced).contains(&("a".into(), "spec.replicas".into())));
        // `a` drops x and its label: removed; it drops replicas too, but that is b's now.
        let after = apply(Some(&forced), &json!({"spec": {}}), &writer("a"), false).unwrap();
        assert_eq!(after["spec"], json!({"replicas": 2}));
        assert_eq!(after["metadata"].get("labels"), None, "the emptied labels map goes with its last label");
    }

    #[test]
    fn updates_take_what_they_change() {
        let obj = apply(None, &json!({"spec": {"replicas": 1, "y": 1}}), &writer("a"), false).unwrap();
        let mut new = obj.clone();
        new["spec"]["replicas"] = json!(3);
        update(Some(&obj), &mut new, &writer("kubectl"));
        let entries = new["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(entries[1]["operation"], "Update");
        assert_eq!(entries[1]["fieldsV1"], json!({"f:spec": {"f:replicas": {}}}));
        assert_eq!(entries[0]["fieldsV1"], json!({"f:spec": {"f:y": {}}}));
    }
}
