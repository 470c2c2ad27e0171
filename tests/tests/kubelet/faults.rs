//! Faults the kubelet double reports as a cluster does: a taken port, a missing binary, the
//! directory of a killed kubelet.

use super::*;

/// Core/v1 Events about pod `name` in `pool`: (reason, message).
fn pod_events(store: &Store, name: &str) -> Vec<(String, String)> {
    let events = resources::find("", "v1", "events").unwrap();
    store
        .list(events, Some("pool"), |e| e.pointer("/involvedObject/name").and_then(Value::as_str) == Some(name))
        .0
        .iter()
        .map(|e| (e["reason"].as_str().unwrap_or("").to_owned(), e["message"].as_str().unwrap_or("").to_owned()))
        .collect()
}

#[tokio::test]
async fn a_port_taken_on_every_address_leaves_the_pod_unschedulable_with_an_event_and_the_kubelet_working() {
    let (server, _kubelet, client) = start_process().await;
    let store = &*server.store;
    // A listener on 0.0.0.0 holds its port on every loopback address.
    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let ports = json!({"ports": [{"name": "http", "containerPort": port}, {"name": "admin", "containerPort": 9090}]});
    let deployments: Api<Deployment> = Api::namespaced(client, "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, ports, json!({}))).await.unwrap();
    let (name, condition) = until_pods(store, 30, |pods| {
        let pod = pods.first()?;
        let condition = pod.pointer("/status/conditions/0")?.clone();
        (condition["type"] == "PodScheduled").then(|| (pod["metadata"]["name"].as_str().unwrap().to_owned(), condition))
    })
    .await;
    assert_eq!((condition["status"].as_str(), condition["reason"].as_str()), (Some("False"), Some("Unschedulable")));
    let message = condition["message"].as_str().unwrap();
    assert!(message.contains(&format!("port {port} is taken")) && message.contains("0.0.0.0"), "{message}");
    let events = pod_events(store, &name);
    assert!(events.iter().any(|(reason, m)| reason == "FailedScheduling" && m == message), "{events:?}");

    // The kubelet is not stuck: a Deployment on free ports still comes up.
    let mut other = serde_json::to_value(sidecar_deployment(1, json!({}), json!({}))).unwrap();
    other["metadata"]["name"] = json!("other");
    other["spec"]["selector"]["matchLabels"]["app"] = json!("other");
    other["spec"]["template"]["metadata"]["labels"]["app"] = json!("other");
    deployments.create(&PostParams::default(), &serde_json::from_value(other).unwrap()).await.unwrap();
    let other_ready =
        |p: &Value| p["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("other-")) && pod_ready(p);
    until_pods(store, 60, |pods| pods.iter().any(other_ready).then_some(())).await;
    drop(held);
}

#[tokio::test]
async fn a_missing_sidecar_binary_fails_the_pod_with_a_start_error_and_an_event() {
    // Refused at start, whether relative or absolute.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ApiServer::start(listener).unwrap();
    for missing in ["target/debug/no-such-sidecar", "/nonexistent/inferpool-sidecar"] {
        let refused = Kubelet::start(std::sync::Arc::clone(&server.store), Mode::Process { sidecar: missing.into() });
        let error = refused.err().expect("a missing sidecar binary is refused");
        assert!(error.to_string().contains(missing), "{error}");
    }

    // Gone after start (a rebuild deleted it): each start fails with the reason, never exit 127.
    let dir = tempfile::tempdir().unwrap();
    let sidecar = dir.path().join("inferpool-sidecar");
    std::fs::copy(sidecar_bin(), &sidecar).unwrap();
    let _kubelet =
        Kubelet::start_with(std::sync::Arc::clone(&server.store), Mode::Process { sidecar: sidecar.clone() }, FAST)
            .unwrap();
    std::fs::remove_file(&sidecar).unwrap();
    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client, "pool");
    deployments.create(&PostParams::default(), &sidecar_deployment(1, json!({}), json!({}))).await.unwrap();
    let store = &*server.store;
    let (name, last) = until_pods(store, 30, |pods| {
        let pod = pods.first()?;
        let last = pod.pointer("/status/containerStatuses/0/lastState/terminated")?.clone();
        Some((pod["metadata"]["name"].as_str()?.to_owned(), last))
    })
    .await;
    assert_eq!((last["reason"].as_str(), last["exitCode"].as_u64()), (Some("StartError"), Some(128)), "{last}");
    let message = last["message"].as_str().unwrap();
    assert!(message.contains(sidecar.to_str().unwrap()) && message.contains("no such file"), "{message}");
    let events = pod_events(store, &name);
    assert!(events.iter().any(|(reason, m)| reason == "Failed" && m.contains("no such file")), "{events:?}");
}

#[tokio::test]
async fn a_killed_kubelets_directory_is_removed_by_the_next_one() {
    // A process id above the kernel's limit is never alive.
    let stale = std::env::temp_dir().join(format!("{}4294967-stale", inferpool_tests::kubelet::ROOT_PREFIX));
    std::fs::create_dir_all(stale.join("pool/model-0")).unwrap();
    let ours =
        std::env::temp_dir().join(format!("{}{}-kept", inferpool_tests::kubelet::ROOT_PREFIX, std::process::id()));
    std::fs::create_dir_all(&ours).unwrap();
    let (_server, _kubelet, _client) = start(Mode::Fake).await;
    assert!(!stale.exists(), "{} was left", stale.display());
    assert!(ours.exists(), "a live process's directory was removed");
    std::fs::remove_dir_all(&ours).unwrap();
}
