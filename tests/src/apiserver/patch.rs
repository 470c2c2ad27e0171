//! Writes computed from the stored object: patches (JSON merge, strategic merge as merge, JSON
//! patch), server-side apply with field ownership, and the `/scale` subresource. Each reads the
//! object, computes the new one without I/O and hands it to the store, retrying when the object
//! changed in between (as the real API server does for patches without a precondition).

use std::sync::Arc;

use http::{Method, Response, StatusCode};
use serde_json::{Value, json};

use super::error::Status;
use super::fields::{self, Writer};
use super::store::{self, Key, Part, Store};
use super::{Body, Call, Target, full, parse_json, query, record_update, resources, scope};

/// The `/scale` subresource: an `autoscaling/v1` Scale read from, and written to, the object.
pub(super) fn scale(
    store: &Arc<Store>,
    key: &Key,
    paths: resources::ScalePaths,
    call: &Call,
) -> Result<Response<Body>, Status> {
    let (method, content_type, body) = (call.method, call.content_type, call.body);
    let view = |object: &Value| {
        let selector = match object.pointer(paths.selector) {
            Some(Value::Object(labels)) => {
                labels.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(",")
            }
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        json!({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                "name": object.pointer("/metadata/name"),
                "namespace": object.pointer("/metadata/namespace"),
                "uid": object.pointer("/metadata/uid"),
                "resourceVersion": object.pointer("/metadata/resourceVersion"),
                "creationTimestamp": object.pointer("/metadata/creationTimestamp"),
            },
            "spec": {"replicas": object.pointer(paths.spec_replicas).cloned().unwrap_or(json!(0))},
            "status": {"replicas": object.pointer(paths.status_replicas).cloned().unwrap_or(json!(0)), "selector": selector},
        })
    };
    let current = store.get(key)?;
    if *method == Method::GET {
        return Ok(full(StatusCode::OK, &view(&current)));
    }
    let mut requested = view(&current);
    match (method, content_type) {
        (&Method::PUT, _) => requested = parse_json(body)?,
        (&Method::PATCH, ct) if ct.starts_with("application/json-patch+json") => {
            requested = apply_json_patch(&requested, &parse_json(body)?)?;
        }
        (&Method::PATCH, _) => merge(&mut requested, &parse_json(body)?),
        (m, _) => return Err(Status::refused(405, "MethodNotAllowed", format!("{m} is not supported on /scale"))),
    }
    let replicas = requested
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .filter(|r| *r >= 0)
        .ok_or_else(|| Status::invalid(key.resource, &key.name, "spec.replicas", "must be a whole number >= 0"))?;
    let mut object = current;
    if let Some(slot) = object.pointer_mut(paths.spec_replicas) {
        *slot = json!(replicas);
    } else {
        let mut patch = json!({});
        let mut cursor = &mut patch;
        for token in paths.spec_replicas.trim_start_matches('/').split('/') {
            cursor = &mut cursor[token];
        }
        *cursor = json!(replicas);
        merge(&mut object, &patch);
    }
    let updated = store.replace(key, Part::Main, object, false)?;
    Ok(full(StatusCode::OK, &view(&updated)))
}

/// `doc` with an RFC 6902 JSON patch applied, all or nothing (kube-rs's finalizer helper adds and
/// removes finalizers with one, under a `test` precondition). A malformed patch or an operation
/// that fails (a `test` that does not hold, a path that names nothing) is 422 Invalid.
pub fn apply_json_patch(doc: &Value, patch: &Value) -> Result<Value, Status> {
    let invalid = |message: String| Status::refused(422, "Invalid", message);
    let patch: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| invalid(format!("malformed JSON patch: {e}")))?;
    let mut out = doc.clone();
    json_patch::patch(&mut out, &patch).map_err(|e| invalid(e.to_string()))?;
    Ok(out)
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// How often a patch without a resourceVersion precondition is retried when the object changed
/// under it (the real API server retries such patches internally too).
const PATCH_RETRIES: usize = 5;

pub(super) fn patch(store: &Arc<Store>, t: &Target, key: &Key, call: &Call) -> Result<Response<Body>, Status> {
    let patch = parse_json(call.body)?;
    let ct = call.content_type;
    let apply = ct.starts_with("application/apply-patch");
    let json_patch = ct.starts_with("application/json-patch+json");
    if !apply
        && !json_patch
        && !ct.starts_with("application/merge-patch+json")
        && !ct.starts_with("application/strategic-merge-patch+json")
    {
        return Err(Status::refused(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format: {ct}"),
        ));
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = if apply {
            server_side_apply(store, t, key, call, &patch)
        } else {
            patch_once(store, t, key, call, &patch, json_patch)
        };
        match result {
            Err(e)
                if e.code == 409
                    && e.reason == "Conflict"
                    && e.details.get("causes").is_none()
                    && attempt < PATCH_RETRIES => {}
            other => return other,
        }
    }
}

fn patch_once(
    store: &Arc<Store>,
    t: &Target,
    key: &Key,
    call: &Call,
    patch: &Value,
    json_patch: bool,
) -> Result<Response<Body>, Status> {
    let current = store.get(key)?;
    let mut object = if json_patch {
        apply_json_patch(&current, patch)?
    } else {
        let mut object = current.clone();
        merge(&mut object, patch);
        object
    };
    // A patch carries no resourceVersion unless it asks for a precondition.
    if patch.pointer("/metadata/resourceVersion").is_none() {
        object["metadata"]["resourceVersion"] =
            current.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null);
    }
    record_update(t, call, Some(&current), &mut object);
    Ok(full(StatusCode::OK, &store.replace(key, t.part, object, false)?))
}

fn server_side_apply(
    store: &Arc<Store>,
    t: &Target,
    key: &Key,
    call: &Call,
    body: &Value,
) -> Result<Response<Body>, Status> {
    let Some(manager) = query(call.q, "fieldManager").filter(|m| !m.is_empty()) else {
        return Err(Status::invalid(
            t.resource,
            &key.name,
            "fieldManager",
            "Required value: is required for apply patch",
        ));
    };
    let force = query(call.q, "force").is_some_and(|f| f == "true");
    let current = match store.get(key) {
        Ok(c) => Some(c),
        Err(e) if e.code == 404 && t.part == Part::Main => None,
        Err(e) => return Err(e),
    };
    // A resourceVersion in the applied body is a precondition, as for an update.
    if let Some(wanted) = body.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
        let stored = current.as_ref().and_then(|c| c.pointer("/metadata/resourceVersion")).and_then(Value::as_str);
        if stored != Some(wanted) {
            return Err(Status::conflict(t.resource, &key.name));
        }
    }
    let api_version =
        body.get("apiVersion").and_then(Value::as_str).map_or_else(|| t.resource.api_version(), str::to_owned);
    let time = store::now();
    let writer = Writer { manager: &manager, api_version: &api_version, time: &time, scope: scope(t) };
    let mut object = fields::apply(current.as_ref(), body, &writer, force).map_err(|conflicts| {
        let causes: Vec<_> = conflicts.iter().map(fields::Conflict::cause).collect();
        Status::apply_conflict(t.resource, &key.name, fields::conflict_message(&conflicts), &causes)
    })?;
    match current {
        Some(current) => {
            object["metadata"]["resourceVersion"] =
                current.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null);
            Ok(full(StatusCode::OK, &store.replace(key, t.part, object, false)?))
        }
        None => {
            object["metadata"]["name"] = json!(key.name);
            Ok(full(StatusCode::CREATED, &store.create(t.resource, &key.namespace, object)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::apply_json_patch;

    #[test]
    fn json_patch_operations_and_refusals() {
        let doc = json!({"metadata": {"finalizers": ["a", "b"]}, "spec": {"x": 1}});
        let cases = [
            (json!([{"op": "add", "path": "/metadata/finalizers/-", "value": "c"}]), Ok(json!(["a", "b", "c"]))),
            (json!([{"op": "remove", "path": "/metadata/finalizers/0"}]), Ok(json!(["b"]))),
            (
                json!([{"op": "test", "path": "/metadata/finalizers", "value": ["a", "b"]}, {"op": "replace", "path": "/metadata/finalizers", "value": []}]),
                Ok(json!([])),
            ),
            (json!([{"op": "test", "path": "/metadata/finalizers", "value": ["z"]}]), Err(422)),
            (json!([{"op": "remove", "path": "/metadata/nope/0"}]), Err(422)),
            (json!({"op": "add"}), Err(422)),
            (json!([{"op": "frobnicate", "path": "/spec"}]), Err(422)),
        ];
        for (patch, want) in cases {
            let got = apply_json_patch(&doc, &patch).map(|d| d["metadata"]["finalizers"].clone()).map_err(|s| s.code);
            assert_eq!(got, want, "{patch}");
        }
        let moved = apply_json_patch(&doc, &json!([{"op": "move", "from": "/spec/x", "path": "/spec/y"}])).unwrap();
        assert_eq!(moved["spec"], json!({"y": 1}));
    }
}
