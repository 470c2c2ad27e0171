//! A kubelet double: keeps one Pod per Deployment replica and Deployment status true.
//!
//! It works on the API server double's store directly (it is part of the same control plane).
//! In `fake` mode a Pod is Running and Ready as soon as it exists, with its own loopback IP
//! (127.0.0.2, 127.0.0.3, ...), so Pod IPs are distinct as in a cluster. A Deployment whose pod
//! template changed gets its Pods replaced; Pods deleted by someone else come back; a deleted
//! Deployment's Pods go with it (ownerReference garbage collection).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::apiserver::resources;
use crate::apiserver::store::{Key, Part, Store};

/// The running kubelet double.
pub struct Kubelet {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubelet {
    /// Starts reconciling Deployments in `store` into Pods.
    pub fn start(store: Arc<Store>) -> Kubelet {
        let task = tokio::spawn(async move {
            let mut events = store.subscribe();
            let mut state = State::default();
            loop {
                state.reconcile(&store);
                // Reconcile again after any change to a Deployment or a Pod; its own writes come
                // back here too and settle, since a reconcile with nothing to do writes nothing.
                loop {
                    match events.recv().await {
                        Ok(e) if matches!(e.key.resource.kind, "Deployment" | "Pod") => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        });
        Kubelet { task }
    }
}

#[derive(Default)]
struct State {
    /// The last address handed out; 127.0.0.1 is left to the host.
    next_ip: u32,
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// A short, stable hash of a pod template, as Kubernetes labels pods with.
fn template_hash(template: &Value) -> String {
    let mut h = DefaultHasher::new();
    template.to_string().hash(&mut h);
    format!("{:010x}", h.finish() & 0xff_ffff_ffff)
}

fn owned_by(pod: &Value, uid: &str) -> bool {
    pod.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| refs.iter().any(|r| r.get("uid").and_then(Value::as_str) == Some(uid)))
}

impl State {
    fn ip(&mut self) -> String {
        self.next_ip += 1;
        Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + self.next_ip).to_string()
    }

    fn reconcile(&mut self, store: &Store) {
        let (Some(deployments), Some(pods)) =
            (resources::find("apps", "v1", "deployments"), resources::find("", "v1", "pods"))
        else {
            return;
        };
        let (all_pods, _) = store.list(pods, None, |_| true);
        for d in store.list(deployments, None, |_| true).0 {
            if d.pointer("/metadata/deletionTimestamp").is_some() {
                continue;
            }
            let (ns, name, uid) =
                (str_at(&d, "/metadata/namespace"), str_at(&d, "/metadata/name"), str_at(&d, "/metadata/uid"));
            let want = d.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(1) as usize;
            let template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
            let hash = template_hash(&template);
            let mut mine: Vec<&Value> = all_pods.iter().filter(|p| owned_by(p, uid)).collect();
            // Pods of an older template are replaced.
            for old in mine.iter().filter(|p| str_at(p, "/metadata/labels/pod-template-hash") != hash) {
                let _ = store.delete(&Key {
                    resource: pods,
                    namespace: ns.to_owned(),
                    name: str_at(old, "/metadata/name").to_owned(),
                });
            }
            mine.retain(|p| str_at(p, "/metadata/labels/pod-template-hash") == hash);
            mine.sort_by_key(|p| str_at(p, "/metadata/name").to_owned());
            for extra in mine.iter().skip(want) {
                let _ = store.delete(&Key {
                    resource: pods,
                    namespace: ns.to_owned(),
                    name: str_at(extra, "/metadata/name").to_owned(),
                });
            }
            for _ in mine.len()..want {
                self.create_pod(store, pods, &d, &template, &hash);
            }
            // Fake pods are Ready the moment they exist, so every wanted replica is ready now.
            let running = want;
            let status = json!({"status": {
                "observedGeneration": d.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
                "replicas": running,
                "updatedReplicas": running,
                "readyReplicas": running,
                "availableReplicas": running,
                "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}],
            }});
            let key = Key { resource: deployments, namespace: ns.to_owned(), name: name.to_owned() };
            if d.get("status").is_none_or(|s| *s != status["status"]) {
                let _ = store.replace(&key, Part::Status, status, false);
            }
        }
    }

    fn create_pod(
        &mut self,
        store: &Store,
        pods: &'static resources::Resource,
        d: &Value,
        template: &Value,
        hash: &str,
    ) {
        let mut labels = template.pointer("/metadata/labels").cloned().unwrap_or(json!({}));
        labels["pod-template-hash"] = json!(hash);
        let name = str_at(d, "/metadata/name");
        let pod = json!({
            "metadata": {
                "generateName": format!("{name}-{hash}-"),
                "labels": labels,
                "annotations": template.pointer("/metadata/annotations").cloned().unwrap_or(json!({})),
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                    "uid": str_at(d, "/metadata/uid"), "controller": true, "blockOwnerDeletion": true,
                }],
            },
            "spec": template.get("spec").cloned().unwrap_or(json!({})),
        });
        let ns = str_at(d, "/metadata/namespace");
        let Ok(created) = store.create(pods, ns, pod) else { return };
        let ip = self.ip();
        let status = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "127.0.0.1",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "True"},
            ],
        }});
        let key = Key { resource: pods, namespace: ns.to_owned(), name: str_at(&created, "/metadata/name").to_owned() };
        let _ = store.replace(&key, Part::Status, status, false);
    }
}
