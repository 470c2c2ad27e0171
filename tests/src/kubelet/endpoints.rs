//! EndpointSlices: one per Service with a selector, listing the matching pods' IPs with their
//! readiness and the Service's ports at their `targetPort` (a named one resolved from the pods'
//! container ports), as the EndpointSlice
//! controller keeps them.

use serde_json::{Value, json};

use super::{is_ready, str_at};
use crate::apiserver::resources;
use crate::apiserver::store::{Key, Part, Store};

/// Brings every Service's EndpointSlice in line with its pods.
pub(crate) fn reconcile(store: &Store) {
    let (Some(services), Some(pods), Some(slices)) = (
        resources::find("", "v1", "services"),
        resources::find("", "v1", "pods"),
        resources::find("discovery.k8s.io", "v1", "endpointslices"),
    ) else {
        return;
    };
    for svc in store.list(services, None, |_| true).0 {
        let Some(selector) = svc.pointer("/spec/selector").and_then(Value::as_object).filter(|s| !s.is_empty()) else {
            continue;
        };
        let (ns, name) = (str_at(&svc, "/metadata/namespace"), str_at(&svc, "/metadata/name"));
        // Label keys may hold '/' (app.kubernetes.io/name), so they are looked up, not pointed at.
        let matches = |p: &Value| {
            let labels = p.pointer("/metadata/labels");
            selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        };
        let (mut members, _) = store.list(pods, Some(ns), |p| matches(p) && p.pointer("/status/podIP").is_some());
        members.sort_by_key(|p| str_at(p, "/metadata/name").to_owned());
        let endpoints: Vec<Value> = members
            .iter()
            .map(|p| {
                // A terminating pod is never `ready` (clients stop opening connections to it);
                // `serving` still says whether it passes its readiness probe.
                let terminating = p.pointer("/metadata/deletionTimestamp").is_some();
                json!({
                    "addresses": [str_at(p, "/status/podIP")],
                    "conditions": {"ready": is_ready(p) && !terminating, "serving": is_ready(p), "terminating": terminating},
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": str_at(p, "/metadata/name"), "uid": str_at(p, "/metadata/uid")},
                })
            })
            .collect();
        let ports: Vec<Value> = svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| {
                let port = match p.get("targetPort") {
                    Some(Value::String(name)) => members.first().and_then(|pod| container_port(pod, name)),
                    Some(number) if number.is_number() => Some(number.clone()),
                    _ => None,
                }
                .or_else(|| p.get("port").cloned());
                json!({"name": p.get("name").cloned().unwrap_or(json!("")), "port": port, "protocol": "TCP"})
            })
            .collect();
        let slice = json!({
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "inferpool-local"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": str_at(&svc, "/metadata/uid"), "controller": true}],
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        });
        let key = Key { resource: slices, namespace: ns.to_owned(), name: name.to_owned() };
        match store.get(&key) {
            Ok(current)
                if current.get("endpoints") == slice.get("endpoints") && current.get("ports") == slice.get("ports") => {
            }
            Ok(mut current) => {
                current["endpoints"] = slice["endpoints"].clone();
                current["ports"] = slice["ports"].clone();
                let _ = store.replace(&key, Part::Main, current, false);
            }
            Err(_) => {
                let _ = store.create(slices, ns, slice);
            }
        }
    }
}

/// The number of a pod's container port called `name` (a Service's named `targetPort`).
fn container_port(pod: &Value, name: &str) -> Option<Value> {
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array)?;
    let ports = containers.iter().filter_map(|c| c.get("ports").and_then(Value::as_array)).flatten();
    ports.into_iter().find(|p| p.get("name").and_then(Value::as_str) == Some(name))?.get("containerPort").cloned()
}
