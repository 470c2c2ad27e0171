//! The autoscaler end to end: real sidecars under real load, the real policy, the real API double.
//!
//! On the 2-core development machines every replica shares the same two cores, so adding replicas
//! cannot bring the p95 back down here; these tests assert what the operator does (decides, scales,
//! waits, pushes, replaces) and the simulator tests (operator/tests/autoscale_sim.rs) assert that
//! the SLA is restored when new replicas bring capacity.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use inferpool_crds::SlaReport;

use super::*;

/// Closed-loop load on the Service's ready endpoints (round robin) over `images` (cycled); with
/// `bypass` every request skips the caches and runs the model, without it repeats are cache hits
/// (memory, disk, Redis).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// `n` distinct PNGs of one real photo (one pixel differs), so each has its own cache key.
fn distinct_images(n: u32) -> Vec<bytes::Bytes> {
    let photo = image::load_from_memory(&inferpool_tests::fixtures::photo("chelsea.png").unwrap()).unwrap().to_rgb8();
    (0..n)
        .map(|i| {
            let mut copy = photo.clone();
            copy.put_pixel(0, 0, image::Rgb([(i % 256) as u8, (i / 256) as u8, 7]));
            let mut out = std::io::Cursor::new(Vec::new());
            copy.write_to(&mut out, image::ImageFormat::Png).unwrap();
            bytes::Bytes::from(out.into_inner())
        })
        .collect()
}

impl Load {
    fn start(
        store: Arc<inferpool_tests::apiserver::store::Store>,
        service: &str,
        workers: usize,
        bypass: bool,
    ) -> Load {
        let one = bytes::Bytes::from(inferpool_tests::fixtures::photo("chelsea.png").unwrap());
        Self::over(store, service, workers, bypass, vec![one])
    }

    fn over(
        store: Arc<inferpool_tests::apiserver::store::Store>,
        service: &str,
        workers: usize,
        bypass: bool,
        images: Vec<bytes::Bytes>,
    ) -> Load {
        let (stop, ok, failed) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let images = Arc::new(images);
        let tasks = (0..workers)
            .map(|worker| {
                let (stop, ok, failed, store, images, service) =
                    (stop.clone(), ok.clone(), failed.clone(), store.clone(), images.clone(), service.to_owned());
                tokio::spawn(async move {
                    let http = reqwest_like::client();
                    let mut n = worker;
                    while !stop.load(Ordering::Relaxed) {
                        let endpoints = inferpool_tests::proxy::endpoints(&store, NS, &service);
                        if endpoints.is_empty() {
                            tokio::task::yield_now().await;
                            continue;
                        }
                        let (ip, port) = &endpoints[n % endpoints.len()];
                        let body = images[n % images.len()].clone();
                        n += 1;
                        if reqwest_like::embed(&http, ip, *port, body, bypass).await {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Load { stop, ok, failed, tasks }
    }

    /// Stops the load: (answered, failed).
    async fn stop_counting(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }

    async fn stop(self) -> u64 {
        self.stop_counting().await.0
    }
}

/// A minimal HTTP client for the load (hyper-util, which the workspace already has).
pub mod reqwest_like {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    pub type Http = Client<HttpConnector, Full<Bytes>>;

    pub fn client() -> Http {
        Client::builder(TokioExecutor::new()).build(HttpConnector::new())
    }

    /// One embedding; true when it succeeded.
    pub async fn embed(http: &Http, ip: &str, port: u16, body: Bytes, bypass: bool) -> bool {
        let mut request =
            http::Request::post(format!("http://{ip}:{port}/api/v1/embed")).header("content-type", "image/png");
        if bypass {
            request = request.header("cache-control", "no-store");
        }
        let request = request.body(Full::new(body)).unwrap();
        match http.request(request).await {
            Ok(response) => {
                let ok = response.status().is_success();
                let _ = response.into_body().collect().await;
                ok
            }
            Err(_) => false,
        }
    }

    /// A replica's admin `/metrics` text ("" when it does not answer).
    pub async fn admin_metrics(http: &Http, ip: &str) -> String {
        let Ok(uri) = format!("http://{ip}:9090/metrics").parse() else { return String::new() };
        let Ok(response) = http.get(uri).await else { return String::new() };
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        String::from_utf8_lossy(&body).into_owned()
    }

    /// A replica's SLA report.
    pub async fn report(http: &Http, ip: &str) -> Option<inferpool_crds::SlaReport> {
        let uri = format!("http://{ip}:8080/api/v1/metrics/sla").parse().ok()?;
        let response = http.get(uri).await.ok()?;
        let body = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&body).ok()
    }
}

fn desired(p: Option<&InferencePool>) -> i32 {
    p.and_then(|p| p.status.as_ref()).map_or(0, |s| s.desired_replicas)
}

#[tokio::test]
async fn load_scales_the_pool_out_and_it_scales_back_only_after_the_delay() {
    let (cluster, operator, pools) = with_operator(Mode::Process { sidecar: sidecar_bin() }).await;
    let spec = json!({
        "replicas": {"min": 1, "max": 3},
        "batching": {"auto": false},
        "cache": {"diskMb": 16, "auto": false},
        "sla": {"p95LatencyMs": 25, "memoryLimitMb": 2048},
        "autoscaling": {"intervalSeconds": 1, "stableWindowSeconds": 10, "panicWindowSeconds": 2,
                        "scaleDownDelaySeconds": 8},
    });
    pools.create(&PostParams::default(), &pool("busy", spec)).await.unwrap();
    wait_for(&pools, "busy", "Ready", has_condition("Ready", "True")).await;

    // Far more concurrent work than one replica serves within 25 ms, even on a machine with many
    // more cores than the two these tests are developed on.
    let load = Load::start(cluster.server.store.clone(), "busy", 16, true);
    let scaled = wait_for(&pools, "busy", "scaled out", |p: Option<&InferencePool>| desired(p) >= 2).await;
    let decision = scaled.status.as_ref().and_then(|s| s.last_decision.clone()).expect("lastDecision");
    assert!(decision.action.starts_with("replicas 1 -> "), "{decision:?}");
    assert!(!decision.reason.is_empty());
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), NS);
    let want = desired(Some(&scaled));
    wait_for(&deployments, "busy", "more replicas ready", move |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref()).and_then(|s| s.ready_replicas).unwrap_or(0) >= want
    })
    .await;
    let breached = wait_for(&pools, "busy", "SLA judged", |p: Option<&InferencePool>| {
        p.is_some_and(|p| condition(p, "SLACompliant").is_some_and(|c| c.0 != "Unknown"))
    })
    .await;
    assert!(breached.status.and_then(|s| s.sla).is_some_and(|sla| sla.rps > 0.0));
    assert!(load.stop().await > 0, "the load got no answers");
    // The decisions and the pool's size are exported for the dashboard.
    let metrics = String::from_utf8_lossy(&operator.metrics.render()).into_owned();
    let scale_ups = "inferpool_pool_decisions_total{action=\"scale_up\",namespace=\"default\",pool=\"busy\"}";
    assert!(metrics.lines().any(|l| l.starts_with(scale_ups)), "{metrics}");
    assert!(metrics.contains("inferpool_pool_sla{figure=\"p95_seconds\",namespace=\"default\",pool=\"busy\"}"));

    // Idle: back to the floor, but not before the scale-down delay.
    let idle_since = std::time::Instant::now();
    wait_for(&pools, "busy", "scaled in", |p: Option<&InferencePool>| desired(p) == 1).await;
    assert!(idle_since.elapsed() >= Duration::from_secs(6), "scaled in after {:?}", idle_since.elapsed());

    // Both decisions are explained by Events on the pool.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(cluster.client.clone(), NS);
    let wanted = |reasons: &[&str]| {
        let reasons: Vec<String> = reasons.iter().map(|r| (*r).to_owned()).collect();
        move |e: Option<&k8s_openapi::api::events::v1::Event>| {
            e.is_some_and(|e| e.reason.as_ref().is_some_and(|r| reasons.contains(r)))
        }
    };
    let about_busy =
        |e: &k8s_openapi::api::events::v1::Event| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("busy");
    let listed = events.list(&ListParams::default()).await.unwrap().items;
    let up = listed.iter().find(|e| about_busy(e) && wanted(&["ScaledUp", "ScaledUpInPanic"])(Some(e)));
    let up =
        up.unwrap_or_else(|| panic!("no scale-up Event: {:?}", listed.iter().map(|e| &e.reason).collect::<Vec<_>>()));
    assert!(up.note.as_deref().is_some_and(|n| n.contains("1 ->") || n.contains("replicas")), "{up:?}");
    let down = listed.iter().find(|e| about_busy(e) && wanted(&["ScaledDown"])(Some(e)));
    assert!(down.is_some(), "no scale-down Event: {:?}", listed.iter().map(|e| &e.reason).collect::<Vec<_>>());
}

/// Two replicas with a pinned batch size and a 1 s autoscaler tick: pushes and replacements show
/// within seconds.
pub fn two_tuned_replicas() -> Value {
    json!({
        "replicas": {"min": 2, "max": 2},
        "batching": {"auto": false, "maxBatchSize": 16},
        "cache": {"diskMb": 16},
        "autoscaling": {"intervalSeconds": 1},
    })
}

#[tokio::test]
async fn a_tuning_change_reaches_every_replica_and_a_killed_replica_is_replaced() {
    let (cluster, _operator, pools) = with_operator(Mode::Process { sidecar: sidecar_bin() }).await;
    let spec = two_tuned_replicas();
    pools.create(&PostParams::default(), &pool("tuned", spec)).await.unwrap();
    wait_for(&pools, "tuned", "Ready", has_condition("Ready", "True")).await;

    // A pinned batch size changed in the spec is pushed live: no pod restarts.
    let before: Vec<String> = pods(&cluster.client, "tuned").await.iter().map(|p| p.name_any()).collect();
    let patch = json!({"spec": {"batching": {"maxBatchSize": 8, "maxDelayMs": 3}}});
    pools.patch("tuned", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let http = reqwest_like::client();
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            let mut reports: Vec<SlaReport> = Vec::new();
            for pod in pods(&cluster.client, "tuned").await {
                if let Some(r) =
                    reqwest_like::report(&http, &pod.status.and_then(|s| s.pod_ip).unwrap_or_default()).await
                {
                    reports.push(r);
                }
            }
            if reports.len() == 2 && reports.iter().all(|r| (r.tuning.max_batch_size, r.tuning.max_delay_ms) == (8, 3))
            {
                return reports;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the tuning never reached both replicas");
    assert!(reached.iter().all(|r| r.tuning.generation >= 2));
    let after: Vec<String> = pods(&cluster.client, "tuned").await.iter().map(|p| p.name_any()).collect();
    assert_eq!(before, after, "a tuning change restarted pods");
    // The reconciler writes the durable copy on its own schedule, which may come after the push.
    let config_maps: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), NS);
    wait_for(&config_maps, "tuned-tuning", "new pods start with the new batch size", |cm: Option<&ConfigMap>| {
        cm.and_then(|c| c.data.as_ref()?.get("INFERPOOL_MAX_BATCH")).map(String::as_str) == Some("8")
    })
    .await;

    // A killed replica is replaced and the pool is Ready again.
    let pod_api: Api<Pod> = Api::namespaced(cluster.client.clone(), NS);
    pod_api.delete(&after[0], &DeleteParams::default()).await.unwrap();
    wait_gone(&pod_api, &after[0]).await;
    let ready = wait_for(&pools, "tuned", "Ready with a replacement", |p: Option<&InferencePool>| {
        p.is_some_and(|p| condition(p, "Ready").is_some_and(|c| c.0 == "True"))
            && p.and_then(|p| p.status.as_ref()).is_some_and(|s| s.ready_replicas == 2)
    })
    .await;
    assert_eq!(ready.status.unwrap().replicas, 2);
}

#[tokio::test]
async fn a_redis_outage_does_not_breach_the_sla() {
    let mut redis = inferpool_tests::redis::Redis::start().unwrap();
    let (cluster, _operator, pools) = with_operator(Mode::Process { sidecar: sidecar_bin() }).await;
    // Small memory tier, no disk tier, many distinct images: lookups reach Redis, so Redis is on
    // the request path when it dies.
    let spec = json!({
        "replicas": {"min": 1, "max": 1},
        "cache": {"memoryEntries": 8, "diskMb": 0, "auto": false, "redis": {"url": redis.url()}},
        // The outage takes Redis hits away by design; latency and errors are what must hold.
        "sla": {"p95LatencyMs": 2000, "maxErrorRate": 0.01, "minCacheHitRate": 0.0},
        "autoscaling": {"intervalSeconds": 1, "stableWindowSeconds": 6, "panicWindowSeconds": 2},
    });
    pools.create(&PostParams::default(), &pool("shared", spec)).await.unwrap();
    wait_for(&pools, "shared", "Ready", has_condition("Ready", "True")).await;
    let load = Load::over(cluster.server.store.clone(), "shared", 2, false, distinct_images(64));
    wait_for(&pools, "shared", "compliant", has_condition("SLACompliant", "True")).await;
    // Redis answers lookups before the outage (the second pass over the images).
    let pod_ip = pods(&cluster.client, "shared").await[0].status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
    let redis_hits = || async {
        let text = reqwest_like::admin_metrics(&reqwest_like::client(), &pod_ip).await;
        text.lines()
            .find(|l| {
                l.starts_with("inferpool_cache_requests_total{")
                    && l.contains("tier=\"redis\"")
                    && l.contains("result=\"hit\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    tokio::time::timeout(WAIT, async {
        while redis_hits().await == 0.0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("Redis never answered a lookup: it is not on the request path");

    redis.kill();
    // Watch the pool through two stable windows of the outage: it must never leave the SLA.
    let mut stream = std::pin::pin!(kube::runtime::watcher(
        pools.clone(),
        kube::runtime::watcher::Config::default().fields("metadata.name=shared")
    ));
    use futures::TryStreamExt;
    let watched = tokio::time::timeout(Duration::from_secs(12), async {
        while let Some(event) = stream.try_next().await.unwrap() {
            if let kube::runtime::watcher::Event::Apply(p) | kube::runtime::watcher::Event::InitApply(p) = event {
                assert_ne!(condition(&p, "SLACompliant").map(|c| c.0).as_deref(), Some("False"), "{:?}", p.status);
            }
        }
    })
    .await;
    assert!(watched.is_err(), "the watch ended early");
    let (answered, failed) = load.stop_counting().await;
    eprintln!("Redis outage under load of 64 distinct images: {answered} answered, {failed} failed");
    assert!(answered > 0);
    assert_eq!(failed, 0, "requests failed while Redis was down");
}
