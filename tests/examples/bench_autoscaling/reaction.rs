//! Part 2, reaction time: one pool of real sidecars (process mode), the release operator as a
//! child process, closed-loop load that one replica cannot serve within the SLA. Per run, on a
//! fresh pool, from the moment the load starts (t0):
//! - breach: the first poll (every 100 ms) in which a ready replica's own 2 s window p95 exceeds
//!   the target;
//! - decision: the pool's `status.desiredReplicas` first rises;
//! - applied: the Deployment's `spec.replicas` reaches it (the reconcile wrote it);
//! - created: the pool has that many pods (the kubelet double created the new one);
//! - ready: the Deployment's `status.readyReplicas` reaches it (the new sidecar loaded its model,
//!   warmed up and passed its readiness probe).
//!
//! The object times come from the store's change feed (a watch without HTTP), so reading them
//! costs the operator nothing.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use inferpool_crds::SlaReport;
use inferpool_tests::apiserver::ApiServer;
use inferpool_tests::apiserver::resources;
use inferpool_tests::apiserver::store::{Key, Store};
use inferpool_tests::kubelet::{Kubelet, Mode};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, Config};
use serde_json::{Value, json};

use crate::Args;
use crate::support::{self, NS, OperatorProcess};

fn get(store: &Store, group: &str, version: &str, plural: &str, name: &str) -> Option<Value> {
    let resource = resources::find(group, version, plural)?;
    store.get(&Key { resource, namespace: NS.to_owned(), name: name.to_owned() }).ok()
}

fn pod_count(store: &Store, pool: &str) -> usize {
    let Some(resource) = resources::find("", "v1", "pods") else { return 0 };
    store
        .list(resource, Some(NS), |p| {
            p.pointer("/metadata/labels/app.kubernetes.io~1instance").and_then(Value::as_str) == Some(pool)
                && p.pointer("/metadata/deletionTimestamp").is_none()
        })
        .0
        .len()
}

fn int(object: Option<&Value>, pointer: &str) -> i64 {
    object.and_then(|o| o.pointer(pointer)).and_then(Value::as_i64).unwrap_or(0)
}

/// Closed-loop load on the pool's ready endpoints, round robin, every request `no-store`.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(store: Arc<Store>, pool: &str, workers: usize, image: Bytes, content_type: &'static str) -> Load {
        let (stop, ok, failed) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let tasks = (0..workers)
            .map(|worker| {
                let (stop, ok, failed, store, image, pool) =
                    (stop.clone(), ok.clone(), failed.clone(), store.clone(), image.clone(), pool.to_owned());
                tokio::spawn(async move {
                    let http = support::http();
                    let mut n = worker;
                    while !stop.load(Ordering::Relaxed) {
                        let endpoints = inferpool_tests::proxy::endpoints(&store, NS, &pool);
                        let Some((ip, port)) = endpoints.get(n % endpoints.len().max(1)) else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        n += 1;
                        let request = http::Request::post(format!("http://{ip}:{port}/api/v1/embed"))
                            .header("content-type", content_type)
                            .header("cache-control", "no-store")
                            .body(Full::new(image.clone()));
                        let done = match request {
                            Ok(request) => match http.request(request).await {
                                Ok(response) => {
                                    let success = response.status().is_success();
                                    success && response.into_body().collect().await.is_ok()
                                }
                                Err(_) => false,
                            },
                            Err(_) => false,
                        };
                        if done { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load { stop, ok, failed, tasks }
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// Polls every ready replica's SLA report every 100 ms; the first 2 s window p95 above `target`
/// is the breach. Returns (breach time, its p95, every sample).
async fn watch_sla(
    store: Arc<Store>,
    pool: String,
    target: f64,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> (Option<f64>, Option<f64>, Vec<Value>) {
    let http = support::http();
    let (mut breach, mut breach_p95, mut samples) = (None, None, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        let tick = Instant::now();
        for (ip, port) in inferpool_tests::proxy::endpoints(&store, NS, &pool) {
            let url = format!("http://{ip}:{port}/api/v1/metrics/sla");
            let Some((200, body)) = support::get(&http, &url, Duration::from_millis(500)).await else { continue };
            let Ok(report) = serde_json::from_slice::<SlaReport>(&body) else { continue };
            let at = t0.elapsed().as_secs_f64();
            let Some(window) = report.windows.iter().find(|w| w.seconds == 2).or(report.windows.first()) else {
                continue;
            };
            samples.push(json!({
                "t_s": at, "pod": ip, "window_s": window.seconds, "requests": window.requests,
                "rps": window.rps, "p95_ms": window.latency_ms.p95, "queue_depth": report.queue_depth,
            }));
            if breach.is_none() && window.requests > 0 && window.latency_ms.p95 > target {
                breach = Some(at);
                breach_p95 = Some(window.latency_ms.p95);
            }
        }
        tokio::time::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed())).await;
    }
    (breach, breach_p95, samples)
}

/// IPs of the pool's pods that have one.
fn pod_ips(store: &Store, pool: &str) -> Vec<String> {
    let Some(resource) = resources::find("", "v1", "pods") else { return Vec::new() };
    let (pods, _) = store.list(resource, Some(NS), |p| {
        p.pointer("/metadata/labels/app.kubernetes.io~1instance").and_then(Value::as_str) == Some(pool)
    });
    pods.iter().filter_map(|p| Some(p.pointer("/status/podIP")?.as_str()?.to_owned())).collect()
}

/// When a pod that was not there at t0 first answers `/readyz` itself (polled every 100 ms): the
/// sidecar's own readiness, before the kubelet's probe period adds its share.
async fn watch_new_ready(
    store: Arc<Store>,
    pool: String,
    old: Vec<String>,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Option<f64> {
    let http = support::http();
    while !stop.load(Ordering::Relaxed) {
        for ip in pod_ips(&store, &pool).into_iter().filter(|ip| !old.contains(ip)) {
            let url = format!("http://{ip}:8080/readyz");
            if support::get(&http, &url, Duration::from_millis(300)).await.is_some_and(|(s, _)| s == 200) {
                return Some(t0.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Waits until `done` holds for the store, re-checking on every change and at least every 100 ms.
async fn wait_store(
    store: &Store,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let mut changes = store.subscribe();
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), changes.recv()).await;
    }
    Ok(())
}

fn pool_spec(args: &Args) -> Value {
    json!({
        "replicas": {"min": 1, "max": args.max_replicas},
        "batching": {"auto": false},
        "cache": {"diskMb": 16, "auto": false},
        "sla": {"p95LatencyMs": args.p95_ms, "memoryLimitMb": 2048},
        "autoscaling": {"enabled": true, "intervalSeconds": 1, "stableWindowSeconds": 10,
                        "panicWindowSeconds": 2, "scaleDownDelaySeconds": 30},
    })
}

/// One run on a fresh pool.
async fn one_run(
    args: &Args,
    store: &Arc<Store>,
    pools: &Api<inferpool_crds::InferencePool>,
    image: &Bytes,
    content_type: &'static str,
    run: u32,
    out: &Path,
) -> anyhow::Result<Value> {
    let name = format!("react-{run}");
    let pool: inferpool_crds::InferencePool = serde_json::from_value(json!({
        "apiVersion": "inferpool.dev/v1alpha1", "kind": "InferencePool",
        "metadata": {"name": name, "namespace": NS}, "spec": pool_spec(args),
    }))?;
    pools.create(&PostParams::default(), &pool).await.with_context(|| format!("creating {name}"))?;
    let created = Instant::now();
    let pool_of = || get(store, "inferpool.dev", "v1alpha1", "inferencepools", &name);
    let deployment_of = || get(store, "apps", "v1", "deployments", &name);
    wait_store(store, Duration::from_secs(args.reaction_timeout_seconds), "the pool is Ready", || {
        pool_of().is_some_and(|p| support::condition(&p, "Ready").as_deref() == Some("True"))
    })
    .await?;
    let pool_ready_s = created.elapsed().as_secs_f64();
    // A few idle ticks so the pool's history holds a quiet baseline before the load.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = int(pool_of().as_ref(), "/status/desiredReplicas").max(1);
    eprintln!("reaction run {run}: {name} Ready after {pool_ready_s:.1} s with {before} replica(s); load starts");

    let t0 = Instant::now();
    let load = Load::start(Arc::clone(store), &name, args.workers, image.clone(), content_type);
    let stop_sla = Arc::new(AtomicBool::new(false));
    let sla = tokio::spawn(watch_sla(Arc::clone(store), name.clone(), f64::from(args.p95_ms), t0, stop_sla.clone()));
    let old_ips = pod_ips(store, &name);
    let new_ready = tokio::spawn(watch_new_ready(Arc::clone(store), name.clone(), old_ips, t0, stop_sla.clone()));

    let timeout = Duration::from_secs(args.reaction_timeout_seconds);
    let mut wanted = 0;
    wait_store(store, timeout, "desiredReplicas rises", || {
        wanted = int(pool_of().as_ref(), "/status/desiredReplicas");
        wanted > before
    })
    .await?;
    let t_decision = t0.elapsed().as_secs_f64();
    let decided = pool_of();
    let decision = decided.as_ref().and_then(|p| p.pointer("/status/lastDecision")).cloned().unwrap_or(Value::Null);
    let target = wanted;
    wait_store(store, timeout, "the Deployment asks for it", || {
        int(deployment_of().as_ref(), "/spec/replicas") >= target
    })
    .await?;
    let t_applied = t0.elapsed().as_secs_f64();
    wait_store(store, timeout, "the pods exist", || pod_count(store, &name) >= target as usize).await?;
    let t_created = t0.elapsed().as_secs_f64();
    wait_store(store, timeout, "the new replicas are ready", || {
        int(deployment_of().as_ref(), "/status/readyReplicas") >= target
    })
    .await?;
    let t_ready = t0.elapsed().as_secs_f64();
    // Keep the load a moment longer so the samples show the replicas after the scale-out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failed) = load.stop().await;
    stop_sla.store(true, Ordering::Relaxed);
    let (t_breach, breach_p95, samples) = sla.await?;
    let t_sidecar_ready = new_ready.await?;
    let load_s = t0.elapsed().as_secs_f64();
    let final_desired = int(pool_of().as_ref(), "/status/desiredReplicas");
    eprintln!(
        "reaction run {run}: breach {} s, decision {t_decision:.2} s ({before} -> {wanted}), ready {t_ready:.2} s",
        t_breach.map_or("never".into(), |b| format!("{b:.2}"))
    );

    let lines: Vec<String> = samples.iter().map(Value::to_string).collect();
    std::fs::write(out.join(format!("reaction-{run}-sla.jsonl")), lines.join("\n") + "\n")?;

    pools.delete(&name, &DeleteParams::default()).await.with_context(|| format!("deleting {name}"))?;
    wait_store(store, Duration::from_secs(60), "the pool's pods are gone", || pod_count(store, &name) == 0).await?;

    let since_breach = |t: f64| t_breach.map(|b| t - b);
    Ok(json!({
        "run": run,
        "pool": name,
        "pool_ready_s": pool_ready_s,
        "replicas_before": before,
        "replicas_decided": wanted,
        "replicas_final_desired": final_desired,
        "t_breach_s": t_breach,
        "breach_p95_ms": breach_p95,
        "t_decision_s": t_decision,
        "t_applied_s": t_applied,
        "t_created_s": t_created,
        "t_sidecar_ready_s": t_sidecar_ready,
        "t_ready_s": t_ready,
        "breach_to_decision_s": since_breach(t_decision),
        "decision_to_ready_s": t_ready - t_decision,
        "breach_to_ready_s": since_breach(t_ready),
        "decision": decision,
        "load_s": load_s,
        "requests_ok": ok,
        "requests_failed": failed,
        "sla_samples": samples.len(),
    }))
}

/// Runs part 2 and returns its raw results.
pub async fn run(args: &Args, out: &Path) -> anyhow::Result<Value> {
    let image_path = args.image.as_deref().context("--image is needed for the reaction part")?;
    let image = Bytes::from(std::fs::read(image_path).with_context(|| format!("reading {}", image_path.display()))?);
    let content_type = match image_path.extension().and_then(|e| e.to_str()) {
        Some("png") => "image/png",
        _ => "image/jpeg",
    };
    if !args.sidecar.exists() {
        bail!("{} is missing: build it with `cargo build --release -p inferpool-sidecar`", args.sidecar.display());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = ApiServer::start(listener)?;
    let store = Arc::clone(&server.store);
    let kubelet = Kubelet::start(Arc::clone(&store), Mode::Process { sidecar: args.sidecar.clone() })?;
    let kubeconfig = out.join("kubeconfig-reaction");
    support::write_kubeconfig(&kubeconfig, &server.url())?;
    let client = Client::try_from(Config::new(server.url().parse()?))?;
    let pools: Api<inferpool_crds::InferencePool> = Api::namespaced(client, NS);

    eprintln!("reaction: starting {}", args.operator.display());
    let mut op = OperatorProcess::start(&args.operator, &kubeconfig, &out.join("operator-reaction.log")).await?;
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        op.check_alive()?;
        runs.push(one_run(args, &store, &pools, &image, content_type, run, out).await?);
    }
    op.stop().await;
    kubelet.shutdown().await;

    let result = json!({
        "runs": runs,
        "workers": args.workers,
        "image": image_path.display().to_string(),
        "image_bytes": image.len(),
        "spec": pool_spec(args),
    });
    support::write_json(&out.join("reaction.json"), &result)?;
    Ok(result)
}
