//! The `inferpool-local` binary: a kubeconfig that kube-rs can use, real sidecars in process
//! mode, and no process left behind when it stops.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use kube::{Api, Client, Config};
use serde_json::json;

/// Kills the child if the test fails before it stops it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sidecar_bin() -> std::path::PathBuf {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_inferpool-local")).with_file_name("inferpool-sidecar");
    assert!(bin.exists(), "{} is missing: run `cargo build -p inferpool-sidecar` (make test does)", bin.display());
    bin
}

async fn answers(ip: &str) -> bool {
    answers_at(ip, 8080).await
}

async fn answers_at(ip: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect((ip, port)).await else { return false };
    s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.starts_with("HTTP/1.1 200")
}

#[tokio::test]
async fn up_serves_a_kubeconfig_runs_sidecars_and_leaves_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let proxy_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_inferpool-local"))
            .args(["up", "--mode", "process", "--kubeconfig", kubeconfig.to_str().unwrap()])
            .arg("--sidecar-bin")
            .arg(sidecar_bin())
            .args(["--proxy", &format!("127.0.0.1:{proxy_port}=default/model")])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Its log says when it is up; keep reading so the pipe never fills.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let up = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(30)).ok()).find(|l| l.contains(" up "));
    assert!(up.is_some(), "inferpool-local never logged that it was up");

    let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "model"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "model"}},
            "template": {"metadata": {"labels": {"app": "model"}}, "spec": {"containers": [{"name": "sidecar", "image": "x"}]}},
        },
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &d).await.unwrap();
    let ready = |d: Option<&Deployment>| d.and_then(|d| d.status.as_ref()).is_some_and(|s| s.ready_replicas == Some(1));
    tokio::time::timeout(Duration::from_secs(120), await_condition(deployments, "model", ready))
        .await
        .unwrap()
        .unwrap();
    let client_for_services = client.clone();
    let pods: Api<Pod> = Api::default_namespaced(client);
    let pod = pods.list(&ListParams::default()).await.unwrap().items.remove(0);
    let ip = pod.status.unwrap().pod_ip.unwrap();
    assert!(answers(&ip).await);
    assert!(rx.try_iter().any(|l| l.contains("api") && l.contains("deployments")), "API calls are logged");

    // The Service proxy reaches the pod as a client in the cluster would.
    let services: Api<Service> = Api::default_namespaced(client_for_services.clone());
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "model"},
        "spec": {"selector": {"app": "model"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();
    let through_proxy = async {
        while !answers_at("127.0.0.1", proxy_port).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), through_proxy).await.expect("the proxy never reached the pod");

    Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    // The sidecar was killed before the binary exited; give the kernel a moment to close it.
    let gone = async {
        while answers(&ip).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone).await.expect("the sidecar outlived inferpool-local");
}
