//! Process mode like a kubelet: env from ConfigMaps and Secrets, mounts, probes, restarts with
//! back-off, rolling updates.

use super::*;

#[tokio::test]
async fn process_mode_resolves_env_from_config_maps_and_secrets_like_a_kubelet() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), "pool");
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "model-tuning"},
                "data": {"INFERPOOL_MAX_BATCH": "4", "INFERPOOL_MAX_DELAY_MS": "7", "INFERPOOL_MEMORY_ENTRIES": "100"},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let container = json!({
        "envFrom": [{"configMapRef": {"name": "model-tuning"}}, {"secretRef": {"name": "extra", "optional": true}}],
        "env": [
            {"name": "INFERPOOL_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "model-admin", "key": "token"}}},
            {"name": "INFERPOOL_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "model-redis", "key": "password"}}},
            {"name": "INFERPOOL_MAX_DELAY_MS", "value": "9"},
            {"name": "QUEUE", "value": "3$(INFERPOOL_MAX_BATCH)"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "args": ["--queue-capacity=$(QUEUE)", "--redis-prefix=$(UNDEFINED)"],
    });
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, container, json!({}))).await.unwrap();

    // A missing Secret keeps the pod Pending, its container waiting with the kubelet's reason.
    let waiting = until_pods(store, 30, |pods| {
        pods.iter()
            .find(|p| {
                p.pointer("/status/containerStatuses/0/state/waiting/reason")
                    == Some(&json!("CreateContainerConfigError"))
            })
            .cloned()
    })
    .await;
    assert_eq!(waiting["status"]["phase"], "Pending");
    assert_eq!(
        waiting["status"]["containerStatuses"][0]["state"]["waiting"]["message"],
        "secret \"model-admin\" not found"
    );
    assert!(process_on(&ip_of(&waiting)).is_none(), "no process starts before its config resolves");

    // Created, the Secret lets it go on, to the next missing one: a Secret with stringData.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), "pool");
    let admin = json!({"metadata": {"name": "model-admin"}, "data": {"token": "czNjcjN0"}});
    secrets.create(&PostParams::default(), &serde_json::from_value(admin).unwrap()).await.unwrap();
    until_pods(store, 30, |pods| {
        pods.iter()
            .any(|p| {
                p.pointer("/status/containerStatuses/0/state/waiting/message")
                    == Some(&json!("secret \"model-redis\" not found"))
            })
            .then_some(())
    })
    .await;
    let redis = json!({"metadata": {"name": "model-redis"}, "stringData": {"password": "hunter2"}});
    secrets.create(&PostParams::default(), &serde_json::from_value(redis).unwrap()).await.unwrap();
    let pod = until_pods(store, 60, |pods| pods.iter().find(|p| pod_ready(p)).cloned()).await;
    assert_eq!(pod["metadata"]["name"], waiting["metadata"]["name"], "the same pod started");

    let (_, env, args) = process_on(&ip_of(&pod)).expect("the sidecar runs");
    assert_eq!(env["INFERPOOL_ADMIN_TOKEN"], "s3cr3t", "secretKeyRef data is base64-decoded");
    assert_eq!(env["INFERPOOL_REDIS_PASSWORD"], "hunter2");
    assert_eq!(env["INFERPOOL_MAX_BATCH"], "4", "envFrom a ConfigMap");
    assert_eq!(env["INFERPOOL_MAX_DELAY_MS"], "9", "env overrides envFrom");
    assert_eq!(env["INFERPOOL_MEMORY_ENTRIES"], "100");
    assert_eq!(env["QUEUE"], "34", "$(VAR) expands in env values");
    assert_eq!(env["POD_NAME"], pod["metadata"]["name"].as_str().unwrap());
    assert!(args.contains(&"--queue-capacity=34".to_owned()), "$(VAR) expands in args: {args:?}");
    assert!(args.contains(&"--redis-prefix=$(UNDEFINED)".to_owned()), "undefined references stay: {args:?}");

    // The sidecar runs with them: its live tuning shows the ConfigMap's batch size and the override.
    let tuning = admin_get(&ip_of(&pod), "/api/v1/tuning").await;
    assert_eq!((tuning["maxBatchSize"].clone(), tuning["maxDelayMs"].clone()), (json!(4), json!(9)), "{tuning}");
}

/// `GET path` on the admin port of the pod at `ip`, as JSON.
async fn admin_get(ip: &str, path: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect((ip, 9090)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (_, body) = out.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test]
async fn process_mode_stands_in_for_empty_dir_and_claim_mounts_with_directories() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    let container = json!({
        "env": [
            {"name": "INFERPOOL_CACHE_DIR", "value": "/var/cache/inferpool"},
            {"name": "INFERPOOL_DATA_DIR", "value": "/var/lib/inferpool/data"},
        ],
        "volumeMounts": [
            {"name": "cache", "mountPath": "/var/cache/inferpool"},
            {"name": "data", "mountPath": "/var/lib/inferpool"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    });
    let volumes = json!({"volumes": [
        {"name": "cache", "emptyDir": {}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "model-disk"}},
        {"name": "tmp", "emptyDir": {}},
    ]});
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, container, volumes)).await.unwrap();
    let first = until_pods(store, 60, |pods| pods.iter().find(|p| pod_ready(p)).cloned()).await;
    let (_, env, _) = process_on(&ip_of(&first)).unwrap();
    let cache = std::path::PathBuf::from(&env["INFERPOOL_CACHE_DIR"]);
    let data = std::path::PathBuf::from(&env["INFERPOOL_DATA_DIR"]);
    assert!(cache.is_dir() && cache.ends_with("volumes/cache"), "{cache:?}");
    assert!(data.ends_with("claims/pool/model-disk/data"), "{data:?}");
    let claim = data.parent().unwrap().to_owned();
    std::fs::write(claim.join("written-by-the-first-pod"), b"1").unwrap();

    // A replacement pod gets a fresh emptyDir but the same claim directory.
    let pod_api: Api<Pod> = Api::namespaced(client, "pool");
    let first_name = first["metadata"]["name"].as_str().unwrap().to_owned();
    pod_api.delete(&first_name, &DeleteParams::default()).await.unwrap();
    let second = until_pods(store, 60, |pods| {
        pods.iter().find(|p| pod_ready(p) && p["metadata"]["name"] != first_name.as_str()).cloned()
    })
    .await;
    let (_, env2, _) = process_on(&ip_of(&second)).unwrap();
    assert_eq!(env2["INFERPOOL_DATA_DIR"], env["INFERPOOL_DATA_DIR"], "a claim outlives its pod");
    assert!(claim.join("written-by-the-first-pod").exists());
    assert_ne!(env2["INFERPOOL_CACHE_DIR"], env["INFERPOOL_CACHE_DIR"]);
    // The first pod's emptyDir goes once its process is reaped (asynchronously after the delete).
    let gone = async {
        while cache.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone).await.expect("the deleted pod's emptyDir remains");
}

#[tokio::test]
async fn failing_liveness_restarts_the_container_and_readiness_follows_its_probe() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    let container = json!({
        "startupProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1, "failureThreshold": 60},
        "livenessProbe": {"httpGet": {"path": "/no-such-path", "port": 8080}, "periodSeconds": 1, "failureThreshold": 2},
        "readinessProbe": {"httpGet": {"path": "/no-such-path", "port": "admin"}, "periodSeconds": 1},
    });
    let deployments: Api<Deployment> = Api::namespaced(client, "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, container, json!({}))).await.unwrap();
    let mut pids = BTreeSet::new();
    let mut ever_ready = false;
    let restarted = until_pods(store, 90, |pods| {
        let p = pods.first()?;
        ever_ready |= pod_ready(p);
        if let Some((pid, _, _)) = p.pointer("/status/podIP").and_then(Value::as_str).and_then(process_on) {
            pids.insert(pid);
        }
        let restarts = p.pointer("/status/containerStatuses/0/restartCount").and_then(Value::as_u64)?;
        (restarts >= 2).then(|| p.clone())
    })
    .await;
    let status = &restarted["status"]["containerStatuses"][0];
    assert_eq!(status["lastState"]["terminated"]["exitCode"], 137, "killed: {status}");
    assert!(pids.len() >= 2, "each restart is a new process: {pids:?}");
    assert!(!ever_ready, "readiness follows the container's probe (a 404 path), not /readyz");
    assert_eq!(restarted["status"]["phase"], "Running");
}

#[tokio::test]
async fn a_crashing_container_is_restarted_with_a_doubling_capped_backoff() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    let container = json!({"env": [{"name": "INFERPOOL_MAX_BATCH", "value": "lots"}]});
    let deployments: Api<Deployment> = Api::namespaced(client, "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, container, json!({}))).await.unwrap();
    let mut backoffs: Vec<(u64, String)> = Vec::new();
    let last = until_pods(store, 60, |pods| {
        let c = pods.first()?.pointer("/status/containerStatuses/0")?.clone();
        if c["state"]["waiting"]["reason"] == "CrashLoopBackOff" {
            let seen = (c["restartCount"].as_u64()?, c["state"]["waiting"]["message"].as_str()?.to_owned());
            if backoffs.last() != Some(&seen) {
                backoffs.push(seen);
            }
        }
        (c["restartCount"].as_u64()? >= 5 && c["state"]["waiting"]["reason"] == "CrashLoopBackOff").then_some(c)
    })
    .await;
    assert_eq!(last["lastState"]["terminated"]["exitCode"], 64, "the sidecar's bad-config exit: {last}");
    assert_eq!(last["ready"], false);
    let waits: Vec<&str> = backoffs.iter().map(|(_, m)| m.split_whitespace().nth(1).unwrap()).collect::<Vec<_>>();
    assert_eq!(&waits[..5], ["100ms", "200ms", "400ms", "800ms", "1s"], "{backoffs:?}");
    let counts: Vec<u64> = backoffs.iter().map(|(n, _)| *n).collect();
    assert_eq!(&counts[..5], [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn a_template_change_rolls_pods_within_max_surge_and_max_unavailable() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    let mut d = serde_json::to_value(sidecar_deployment(2, json!({}), json!({}))).unwrap();
    d["spec"]["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
    let d: Deployment = serde_json::from_value(d).unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client, "pool");
    deployments.create(&PostParams::default(), &d).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), await_condition(deployments.clone(), "model", ready(2)))
        .await
        .unwrap()
        .unwrap();
    let old: BTreeSet<String> =
        pods_in(store).iter().map(|p| p["metadata"]["name"].as_str().unwrap().to_owned()).collect();
    let old_hash = pods_in(store)[0]["metadata"]["labels"]["pod-template-hash"].as_str().unwrap().to_owned();

    // Follow every change in order, checking the bounds after each.
    let mut events = store.subscribe();
    let change = json!({"spec": {"template": {"metadata": {"annotations": {"restart": "1"}}}}});
    deployments.patch("model", &PatchParams::default(), &Patch::Merge(change)).await.unwrap();
    let mut pods: BTreeMap<String, Value> =
        pods_in(store).into_iter().map(|p| (p["metadata"]["name"].as_str().unwrap().to_owned(), p)).collect();
    let (mut most, mut done) = (0, false);
    let follow = async {
        while !done {
            let e = events.recv().await.unwrap();
            match e.key.resource.kind {
                "Pod" => {
                    if e.change == Change::Deleted {
                        pods.remove(&e.key.name);
                    } else {
                        pods.insert(e.key.name.clone(), e.object.clone());
                    }
                    let ready = pods.values().filter(|p| pod_ready(p)).count();
                    // As in Kubernetes, pods already terminating no longer count against the surge.
                    let active = pods.values().filter(|p| p.pointer("/metadata/deletionTimestamp").is_none()).count();
                    most = most.max(active);
                    assert!(active <= 3, "more than replicas + maxSurge pods: {:?}", pods.keys());
                    assert!(ready >= 2, "fewer than replicas - maxUnavailable ready at rv {}: {:?}", e.rv, pods.keys());
                }
                "Deployment" => {
                    let s = &e.object["status"];
                    let n = |f: &str| s[f].as_u64().unwrap_or(0);
                    assert!(n("replicas") <= 3 && n("readyReplicas") >= 2, "{s}");
                    assert_eq!(n("availableReplicas"), n("readyReplicas"));
                    assert_eq!(n("unavailableReplicas"), n("replicas") - n("availableReplicas"), "{s}");
                    assert!(n("updatedReplicas") <= n("replicas"));
                    let condition =
                        |t: &str| s["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap().clone();
                    assert_eq!(condition("Available")["status"], "True", "{s}");
                    assert_eq!(condition("Progressing")["status"], "True", "{s}");
                    done = s["observedGeneration"] == e.object["metadata"]["generation"]
                        && n("updatedReplicas") == 2
                        && n("replicas") == 2
                        && n("availableReplicas") == 2
                        && condition("Progressing")["reason"] == "NewReplicaSetAvailable";
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), follow).await.expect("the rollout did not complete");
    assert_eq!(most, 3, "the rollout used its surge");
    // Old pods may still be terminating (their sidecars drain); they are no longer replicas.
    let now: Vec<Value> =
        pods_in(store).into_iter().filter(|p| p.pointer("/metadata/deletionTimestamp").is_none()).collect();
    assert_eq!(now.len(), 2);
    for p in &now {
        assert!(!old.contains(p["metadata"]["name"].as_str().unwrap()), "an old pod remains");
        assert_ne!(p["metadata"]["labels"]["pod-template-hash"], old_hash.as_str());
        assert!(pod_ready(p));
    }
}
