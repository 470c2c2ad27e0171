//! The Grafana dashboard and the alert rules of the Helm chart against real data.
//!
//! Two real sidecar processes stand for the pods `demo-0` and `demo-1` of pool `demo` in namespace
//! `ml`; the operator runs in this process against the API server double and the kubelet double
//! (fake pods: the pool's replicas are counted, not run), reads the pool's figures from the same
//! Prometheus (`spec.metrics.prometheus`) and serves its metrics over HTTP. A real `prometheus`
//! scrapes all three every second while a real load of repeated and new photos runs. Then every
//! panel query of `charts/inferpool/dashboards/inferpool.json` must return data and every alert
//! expression of `charts/inferpool/files/alerts.rules.yaml` must be valid and label its series
//! with the pool; `promtool` checks both `/metrics` texts. The rule file also passes
//! `promtool check rules`, and `promtool test rules` fires each alert from synthetic series
//! (`dashboard/alerts.test.yaml`).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use inferpool_crds::InferencePool;
use inferpool_operator::build::{AdminKey, Settings};
use inferpool_operator::controller::{self, Context};
use inferpool_operator::metrics::Metrics;
use inferpool_operator::server::{self, State};
use inferpool_tests::apiserver::ApiServer;
use inferpool_tests::kubelet::{Kubelet, Mode};
use inferpool_tests::prometheus::{Prometheus, Target};
use inferpool_tests::sidecar_process::{SidecarProcess, call};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::{Api, Client, Config};
use serde_json::{Value, json};
use tokio::sync::watch;

const NAMESPACE: &str = "ml";
const POOL: &str = "demo";
/// What Grafana would put in `$__rate_interval` for a 1 s scrape and a short time range.
const RATE_INTERVAL: &str = "15s";
/// `$__range` and `$__interval` of a 5-minute dashboard.
const RANGE: &str = "5m";
const INTERVAL: &str = "2s";
/// Bound on every wait for something to reach Prometheus.
const WAIT: Duration = Duration::from_secs(90);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// One sidecar process standing for one pod.
type Pod = SidecarProcess;

fn spawn(name: &str, ip: &str) -> Pod {
    // A limit far above what the sidecar uses: the memory panel and alert have a ratio to show,
    // and the memory-pressure guard never acts.
    SidecarProcess::spawn(name, ip, &[("INFERPOOL_MEMORY_LIMIT_MB", "4096")]).unwrap()
}

/// One embedding; `no_store` skips the caches so the request runs the model (queue, batch).
async fn embed(api: SocketAddr, image: &[u8], no_store: bool) -> String {
    let url = format!("http://{api}/api/v1/embed");
    let cache = no_store.then_some("no-store");
    let (status, body) = send(Method::POST, &url, cache, image.to_vec()).await.unwrap();
    assert_eq!(status, 200, "{api}: {}", String::from_utf8_lossy(&body));
    let json: Value = serde_json::from_slice(&body).unwrap();
    json["cache"].as_str().unwrap_or_default().to_owned()
}

async fn send(method: Method, url: &str, cache: Option<&str>, body: Vec<u8>) -> Result<(u16, Bytes), String> {
    let mut headers = vec![("content-type", "image/png")];
    headers.extend(cache.map(|directive| ("cache-control", directive)));
    call(method, url, &headers, body).await
}

async fn get_text(url: &str) -> String {
    let (status, body) = send(Method::GET, url, None, Vec::new()).await.unwrap();
    assert_eq!(status, 200, "GET {url}");
    String::from_utf8(body.to_vec()).unwrap()
}

/// A steady real load until stopped: each photo is a miss the first time a pod sees it and a
/// memory hit after; every fifth request (on alternating pods) skips the caches, so the model
/// runs (queue wait, batches) all along. Paced so that Prometheus and the operator keep some of
/// the two cores.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(pods: Vec<SocketAddr>) -> Load {
        let photos: Vec<Vec<u8>> =
            ["camera.png", "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "coins.png", "brick.png"]
                .iter()
                .map(|name| inferpool_tests::fixtures::photo(name).unwrap())
                .collect();
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (stopped, counter) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let mut i = 0usize;
            while !stopped.load(Ordering::Relaxed) {
                let pod = pods[i % pods.len()];
                // Both pods cycle through a set that grows by one photo every 16 requests.
                let photo = &photos[(i / pods.len()) % (1 + (i / 16).min(photos.len() - 1))];
                embed(pod, photo, i % 5 == 4).await;
                counter.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        });
        Load { stop, sent, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.sent.load(Ordering::Relaxed)
    }
}

/// The operator in this process, its metrics served over HTTP as the binary serves them. The
/// controller runs on a thread of its own with a current-thread runtime (its future is not
/// `Send`), as in tests/tests/operator.
struct Operator {
    metrics: Arc<Metrics>,
    address: SocketAddr,
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

impl Operator {
    fn start(api_url: &str) -> Operator {
        let config = Config::new(api_url.parse().unwrap());
        let metrics = Arc::new(Metrics::new().unwrap());
        // One replica without leader election, as `--leader-election=false` runs it.
        metrics.leader.set(1);
        let (stop, stopped) = watch::channel(false);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let task_metrics = metrics.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let client = Client::try_from(config).unwrap();
                let reporter = Reporter { controller: "inferpool-operator".into(), instance: Some("op-0".into()) };
                let settings = Settings {
                    default_image: "inferpool-sidecar:test".to_owned(),
                    gpu_image: None,
                    image_pull_policy: None,
                };
                let ctx = Arc::new(Context::new(client, settings, admin_key(), reporter, task_metrics.clone()));
                let state = Arc::new(State { metrics: task_metrics, ready: AtomicBool::new(true) });
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let serve = server::serve(listener, state, controller::stop_signal(stopped.clone()));
                let run = async {
                    tokio::select! {
                        () = controller::run(ctx, None, stopped.clone()) => {}
                        () = controller::stop_signal(stopped.clone()) => {}
                    }
                };
                tokio::join!(run, serve);
            });
            runtime.shutdown_background();
        });
        Operator { metrics, address, stop, thread }
    }

    /// The pool's decisions so far, read from the rendered metrics: asking the counter vector
    /// for a label set would create that series and export it at 0.
    fn decisions(&self) -> u64 {
        let text = String::from_utf8(self.metrics.render()).unwrap();
        let pool = format!(r#"pool="{POOL}""#);
        text.lines()
            .filter(|l| l.starts_with("inferpool_pool_decisions_total{") && l.contains(&pool))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    fn stop(self) {
        let _ = self.stop.send(true);
        self.thread.join().unwrap();
    }
}

/// Polls an instant query until its first value satisfies `ok` (Prometheus has no event for a
/// scrape; bounded by [`WAIT`]); returns that value.
async fn until(prom: &Prometheus, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let result = prom.query(promql).await.unwrap_or_else(|e| panic!("{promql}: {e}"));
        let value = result.first().and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok());
        if let Some(v) = value.filter(|v| ok(*v)) {
            return v;
        }
        assert!(Instant::now() < deadline, "`{promql}` not as expected within {WAIT:?}: {result:?}\n{}", prom.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Raises the pool's floor above the replicas it runs until the autoscaler decides to scale up
/// to it: the cheapest real decision. Retries with the next floor when the decision it raced
/// with had already reached this one.
async fn scale_up_decision(pools: &Api<InferencePool>, operator: &Operator) {
    let before = operator.decisions();
    let deadline = Instant::now() + WAIT;
    loop {
        // Set by the first reconcile, long before: reading it creates nothing new.
        let desired = operator.metrics.pool_replicas.with_label_values(&[NAMESPACE, POOL, "desired"]).get();
        let patch = json!({"spec": {"replicas": {"min": desired + 1}}});
        pools.patch(POOL, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        let attempt = Instant::now() + Duration::from_secs(5);
        while Instant::now() < attempt {
            if operator.decisions() > before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(Instant::now() < deadline, "no autoscaler decision after raising the floor to {}", desired + 1);
    }
}

/// A dashboard query with Grafana's variables as the test's dashboard would set them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__range", RANGE)
        .replace("$__interval", INTERVAL)
        .replace("${namespace}", NAMESPACE)
        .replace("$namespace", NAMESPACE)
        .replace("${pool}", POOL)
        .replace("$pool", POOL)
}

/// Every (panel title, query) of the dashboard, rows' nested panels included.
fn panel_queries(panels: &[Value], out: &mut Vec<(String, String)>) {
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
        if panel["type"] == "row" {
            panel_queries(panel["panels"].as_array().map_or(&[][..], Vec::as_slice), out);
            continue;
        }
        let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            out.push((title.clone(), expr.to_owned()));
        }
    }
}

/// Whether any series in an instant-query result holds a number (a panel of NaNs draws nothing).
fn has_number(result: &[Value]) -> bool {
    result.iter().any(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(f64::is_finite))
}

/// Runs `promtool` with `args` and `input` on stdin; panics with its output unless it succeeds.
fn promtool(args: &[&str], input: &str, what: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool: {e} (run `make setup`: the Debian prometheus package has it)"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {} on {what} failed ({}):\n{stdout}{stderr}", args.join(" "), out.status);
}

fn rules_path() -> PathBuf {
    root().join("charts/inferpool/files/alerts.rules.yaml")
}

#[test]
fn alert_rules_pass_promtool_check() {
    promtool(&["check", "rules", rules_path().to_str().unwrap()], "", "alerts.rules.yaml");
}

/// Synthetic series in `dashboard/alerts.test.yaml`: each alert fires at its threshold after its
/// `for`, labelled with the pool recovered from Deployment pod names, and a healthy pool (with
/// StatefulSet-style pod names and no memory limit) raises none.
#[test]
fn alert_rules_fire_at_their_thresholds() {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard/alerts.test.yaml");
    promtool(&["test", "rules", tests.to_str().unwrap()], "", "dashboard/alerts.test.yaml");
}

#[derive(serde::Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(serde::Deserialize)]
struct RuleGroup {
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
struct Rule {
    alert: String,
    expr: String,
    labels: std::collections::BTreeMap<String, String>,
    annotations: std::collections::BTreeMap<String, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_and_alert_query_works_on_real_series() {
    let dashboard_path = root().join("charts/inferpool/dashboards/inferpool.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&dashboard_path).unwrap()).unwrap();
    let rules_text = std::fs::read_to_string(rules_path()).unwrap();
    let rules: RuleFile = serde_saphyr::from_str(&rules_text).unwrap();

    let mut pods = vec![spawn(&format!("{POOL}-0"), "127.0.0.4"), spawn(&format!("{POOL}-1"), "127.0.0.5")];
    for pod in &mut pods {
        pod.wait_ready(Duration::from_secs(120)).await.unwrap();
    }
    // Before the first scrape, so that the counters the rates read exist from Prometheus's first
    // sample on: one miss and a hit on each pod, and one request through the model.
    let warm = inferpool_tests::fixtures::photo("camera.png").unwrap();
    for pod in &pods {
        assert_eq!(embed(pod.api, &warm, false).await, "miss");
        assert_eq!(embed(pod.api, &warm, false).await, "memory");
        assert_eq!(embed(pod.api, &warm, true).await, "bypass");
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = ApiServer::start(listener).unwrap();
    let _kubelet = Kubelet::start(Arc::clone(&api.store), Mode::Fake).unwrap();
    let operator = Operator::start(&api.url());

    let mut targets: Vec<Target> = pods
        .iter()
        .map(|p| Target { address: p.admin, namespace: NAMESPACE.to_owned(), pod: p.name.clone() })
        .collect();
    // The operator's per-pool series name their pool's namespace themselves; in a cluster its
    // ServiceMonitor keeps them with `honorLabels: true`. A target without namespace and pod
    // labels leaves them the same way here.
    targets.push(Target { address: operator.address, namespace: String::new(), pod: String::new() });
    let mut prom = Prometheus::start(&targets, Duration::from_secs(1)).await.unwrap();
    prom.wait_up(Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}"));

    // The pool reads its figures from this Prometheus, i.e. from demo-0 and demo-1.
    let client = Client::try_from(Config::new(api.url().parse().unwrap())).unwrap();
    let pools: Api<InferencePool> = Api::namespaced(client, NAMESPACE);
    let pool: InferencePool = serde_json::from_value(json!({
        "apiVersion": "inferpool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": POOL, "namespace": NAMESPACE},
        "spec": {
            "replicas": {"min": 1, "max": 10},
            "batching": {"auto": false},
            "cache": {"diskMb": 16, "auto": false},
            "autoscaling": {"intervalSeconds": 1},
            "metrics": {"prometheus": {"url": prom.url(), "scrapeIntervalSeconds": 1}},
        },
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();

    let load = Load::start(pods.iter().map(|p| p.api).collect());
    let op = format!(r#"namespace="{NAMESPACE}",pool="{POOL}""#);
    until(&prom, &format!(r#"inferpool_pool_sla{{{op},figure="compliant"}}"#), |_| true).await;
    // Two scaling decisions, the second after Prometheus saw the counter born, so that
    // `increase` has something to count: raising the floor is the cheapest real one.
    scale_up_decision(&pools, &operator).await;
    let decisions = format!("sum(inferpool_pool_decisions_total{{{op}}})");
    let born = until(&prom, &decisions, |v| v >= 1.0).await;
    scale_up_decision(&pools, &operator).await;
    until(&prom, &decisions, |v| v > born).await;
    until(&prom, &format!(r#"inferpool_pool_replicas{{{op},state="desired"}}"#), |v| v >= 3.0).await;

    // The variables: label_values(<series>, <label>) must offer ml and demo.
    let variable = regex::Regex::new(r"^label_values\((.+),\s*(\w+)\)$").unwrap();
    for (name, want) in [("namespace", NAMESPACE), ("pool", POOL)] {
        let var = dashboard["templating"]["list"].as_array().unwrap().iter().find(|v| v["name"] == name);
        let definition = var.and_then(|v| v["definition"].as_str()).unwrap_or_else(|| panic!("no ${name} variable"));
        let parts = variable.captures(definition).unwrap_or_else(|| panic!("${name}: {definition}"));
        let query = format!("count by ({}) ({})", &parts[2], substitute(&parts[1]));
        let result = prom.query(&query).await.unwrap_or_else(|e| panic!("variable ${name}: {e}"));
        assert!(result.iter().any(|s| s["metric"][name] == want), "variable ${name} does not offer {want}: {result:?}");
    }

    // Every panel query: valid, not empty, and at least one number.
    let mut queries = Vec::new();
    panel_queries(dashboard["panels"].as_array().unwrap(), &mut queries);
    let mut failures = Vec::new();
    for (title, expr) in &queries {
        let promql = substitute(expr);
        if promql.contains('$') {
            failures.push(format!("panel {title:?}: unknown variable in {promql}"));
            continue;
        }
        match prom.query(&promql).await {
            Err(e) => failures.push(format!("panel {title:?}: invalid query {promql}: {e}")),
            Ok(result) if result.is_empty() => failures.push(format!("panel {title:?}: no data for {promql}")),
            Ok(result) if !has_number(&result) => {
                failures.push(format!("panel {title:?}: only NaN for {promql}: {result:?}"));
            }
            Ok(result) => eprintln!("panel {title:?}: {} series from {promql}", result.len()),
        }
    }

    // Every alert: valid as written, and its comparison turned into `bool` yields a series that
    // names the pool, which its annotations print.
    let comparison = regex::Regex::new(r"(?s)^(.*\S)\s*(>|<|==|!=|>=|<=)\s*(-?[0-9.]+)\s*$").unwrap();
    let alerts: Vec<&Rule> = rules.groups.iter().flat_map(|g| &g.rules).collect();
    assert!(alerts.len() >= 9, "expected warning and critical rules, got {}", alerts.len());
    for rule in &alerts {
        let name = format!("{} ({})", rule.alert, rule.labels.get("severity").map_or("no severity", String::as_str));
        assert!(matches!(rule.labels.get("severity").map(String::as_str), Some("warning" | "critical")), "{name}");
        assert!(rule.annotations.get("summary").is_some_and(|s| s.contains("$labels.pool")), "{name}: summary");
        if let Err(e) = prom.query(&rule.expr).await {
            failures.push(format!("alert {name}: invalid expression: {e}"));
            continue;
        }
        let Some(parts) = comparison.captures(&rule.expr) else {
            failures.push(format!("alert {name}: expression does not end in `<op> <threshold>`"));
            continue;
        };
        let probe = format!("{} {} bool {}", &parts[1], &parts[2], &parts[3]);
        match prom.query(&probe).await {
            Ok(result)
                if result.iter().any(|s| s["metric"]["pool"] == POOL && s["metric"]["namespace"] == NAMESPACE) => {}
            Ok(result) => failures.push(format!("alert {name}: no series for pool {POOL} from {probe}: {result:?}")),
            Err(e) => failures.push(format!("alert {name}: {probe}: {e}")),
        }
    }
    let sent = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {} panel queries and alerts failed:\n{}",
        failures.len(),
        queries.len() + alerts.len(),
        failures.join("\n")
    );
    assert!(sent > 0);

    // What Prometheus scraped passes its own linter.
    let sidecar_text = get_text(&format!("http://{}/metrics", pods[0].admin)).await;
    promtool(&["check", "metrics"], &sidecar_text, "the sidecar's /metrics");
    let operator_text = get_text(&format!("http://{}/metrics", operator.address)).await;
    assert!(operator_text.contains("inferpool_pool_decisions_total"), "{operator_text}");
    promtool(&["check", "metrics"], &operator_text, "the operator's /metrics");

    drop(prom);
    operator.stop();
}

/// The admin key of every operator a test starts (replicas of one operator share it).
fn admin_key() -> AdminKey {
    AdminKey::from_material(inferpool_tests::fixtures::OPERATOR_ADMIN_KEY.as_bytes()).unwrap()
}
