//! The autoscaler's Prometheus source against a real `prometheus` scraping two real sidecar
//! processes (on 127.0.0.2 and 127.0.0.3, as two pods), with real embedding traffic.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Method;
use inferpool_crds::pool::PrometheusSource;
use inferpool_operator::autoscale::Sample;
use inferpool_operator::autoscale::prometheus::{self, PrometheusError};
use inferpool_tests::prometheus::{Prometheus, Target};
use inferpool_tests::sidecar_process::{SidecarProcess, call as send};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAMESPACE: &str = "ml";
const POOL: &str = "faces";
const TOKEN: &str = "prometheus-test-token";
/// The source's window: long enough to hold the scrape before the traffic and the ones after.
const WINDOW: u32 = 30;

fn photo(name: &str) -> Vec<u8> {
    inferpool_tests::fixtures::photo(name).unwrap()
}

/// A free port on `ip`.
fn free(ip: &str) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

/// One sidecar process standing for one pod.
type Pod = SidecarProcess;

fn spawn(name: &str, ip: &str) -> Pod {
    SidecarProcess::spawn(name, ip, &[("INFERPOOL_ADMIN_TOKEN", TOKEN)]).unwrap()
}

async fn embed(pod: &Pod, image: &[u8]) -> String {
    let url = format!("http://{}/api/v1/embed", pod.api);
    let (status, body) = send(Method::POST, &url, &[("content-type", "image/png")], image.to_vec()).await.unwrap();
    assert_eq!(status, 200, "{}: {}", pod.name, String::from_utf8_lossy(&body));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    json["cache"].as_str().unwrap_or_default().to_owned()
}

fn source(url: &str) -> PrometheusSource {
    PrometheusSource { url: url.to_owned(), selector: None, pod_label: "pod".to_owned(), scrape_interval_seconds: 1 }
}

async fn tick(source: &PrometheusSource, selector: &str) -> Result<Sample, PrometheusError> {
    let client = inferpool_operator::pods::client();
    prometheus::sample(&client, source, selector, WINDOW, 1.0).await
}

/// Polls an instant query until every pod's value reaches `want` (Prometheus has no event for a
/// scrape; bounded).
async fn until_scraped(prom: &Prometheus, promql: &str, pods: &[&str], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let result = prom.query(promql).await.unwrap();
        let value = |pod: &str| {
            result
                .iter()
                .find(|s| s["metric"]["pod"] == pod)
                .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        if pods.iter().all(|p| value(p) >= want) {
            return;
        }
        assert!(Instant::now() < deadline, "`{promql}` did not reach {want} for {pods:?} in 30 s: {result:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One error case: its name, the source and selector asked, the variant expected and a phrase of
/// its message.
type ErrorCase = (&'static str, PrometheusSource, String, fn(&PrometheusError) -> bool, &'static str);

/// A server that answers every request with `answer` (a wrong endpoint configured as Prometheus).
async fn garbage_server(answer: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_source_samples_real_sidecars() {
    let names = [format!("{POOL}-0"), format!("{POOL}-1")];
    let mut pods = vec![spawn(&names[0], "127.0.0.2"), spawn(&names[1], "127.0.0.3")];
    for pod in &mut pods {
        pod.wait_ready(Duration::from_secs(120)).await.unwrap();
    }
    // faces-1 runs a pushed tuning; faces-0 the one it started with (generation 0).
    let tuning = br#"{"generation":5,"maxBatchSize":8,"maxDelayMs":5}"#.to_vec();
    let url = format!("http://{}/api/v1/tuning", pods[1].admin);
    let auth = format!("Bearer {TOKEN}");
    let headers = [("content-type", "application/json"), ("authorization", auth.as_str())];
    let (status, body) = send(Method::PUT, &url, &headers, tuning).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // Warm-up before the first scrape, so that every series the queries read exists (a counter
    // born after a scrape has no earlier sample to take a rate from): one miss and three hits,
    // the traffic's own proportion, so that `rate` extrapolates hits and lookups alike (it stops
    // at the point where a counter would have been zero, which depends on its first value).
    let warm = photo("camera.png");
    for pod in &pods {
        assert_eq!(embed(pod, &warm).await, "miss");
        for _ in 0..3 {
            assert_eq!(embed(pod, &warm).await, "memory");
        }
    }

    let targets: Vec<Target> = pods
        .iter()
        .map(|p| Target { address: p.admin, namespace: NAMESPACE.to_owned(), pod: p.name.clone() })
        .collect();
    let mut prom = Prometheus::start(&targets, Duration::from_secs(1)).await.unwrap();
    prom.wait_up(Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}"));
    let pod_names: Vec<&str> = names.iter().map(String::as_str).collect();
    let embeds = r#"inferpool_requests_total{route="embed"}"#;
    until_scraped(&prom, embeds, &pod_names, 4.0).await;

    // The traffic: two new photos, four times each, on each pod: 8 requests, 2 misses, 6 hits.
    let photos = [photo("astronaut.png"), photo("coffee.png")];
    for pod in &pods {
        for image in &photos {
            for _ in 0..4 {
                embed(pod, image).await;
            }
        }
    }
    until_scraped(&prom, embeds, &pod_names, 12.0).await;

    let src = source(&prom.url());
    let selector = prometheus::selector(&src, NAMESPACE, POOL);
    let sample = tick(&src, &selector).await.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{sample:#?}");
    assert_eq!(sample.at, 1.0);
    assert_eq!((sample.silent, sample.starting), (0, 0));
    let got: Vec<&str> = sample.pods.iter().map(|p| p.pod.as_str()).collect();
    assert_eq!(got, pod_names, "one PodSample per pod");
    for p in &sample.pods {
        // `increase` extrapolates to the window's edges, so it only adds to the 8 requests sent;
        // `rate` is the same increase per second of the window.
        assert!((8..=40).contains(&p.requests), "{p:?}");
        assert!(p.rps > 0.0 && (p.rps * f64::from(WINDOW) - p.requests as f64).abs() <= 0.5, "{p:?}");
        assert!(p.p95_ms > 0.0 && p.p95_ms <= 10_000.0, "{p:?}");
        assert!(p.inference_p95_ms > 0.0, "{p:?}");
        assert_eq!(p.error_rate, 0.0, "{p:?}");
        // 6 of the 8 lookups hit the memory tier.
        assert!((p.cache_hit_rate - 0.75).abs() < 1e-6, "{p:?}");
        // Sequential requests: every inference is a batch of one.
        assert!((p.mean_batch_size - 1.0).abs() < 1e-9, "{p:?}");
        assert_eq!(p.queue_depth, 0, "{p:?}");
        assert!(p.rss_bytes > 10 << 20, "the sidecar's resident memory comes through: {p:?}");
    }
    assert_eq!((sample.pods[0].tuning_generation, sample.pods[1].tuning_generation), (0, 5));

    // A pod whose scrape fails is silent, not a pod without load.
    let mut gone = pods.pop().unwrap();
    gone.kill().await;
    until_scraped(&prom, "1 - up", &pod_names[1..], 1.0).await;
    let sample = tick(&src, &selector).await.unwrap();
    assert_eq!(sample.pods.iter().map(|p| p.pod.as_str()).collect::<Vec<_>>(), [names[0].as_str()]);
    assert_eq!(sample.silent, 1);

    // Errors, each with its own variant and a message that says what is wrong.
    let refused = format!("http://{}", free("127.0.0.1"));
    let garbage =
        garbage_server("HTTP/1.1 200 OK\r\ncontent-length: 12\r\nconnection: close\r\n\r\nnot json :-(").await;
    let proxy =
        garbage_server("HTTP/1.1 502 Bad Gateway\r\ncontent-length: 11\r\nconnection: close\r\n\r\nbad gateway").await;
    let mut wrong_label = source(&prom.url());
    wrong_label.pod_label = "kubernetes_pod_name".to_owned();
    let cases: Vec<ErrorCase> = vec![
        (
            "nothing listens",
            source(&refused),
            selector.clone(),
            |e| matches!(e, PrometheusError::Unreachable { .. }),
            "unreachable",
        ),
        (
            "PromQL syntax error",
            source(&prom.url()),
            r#"pod=~"#.to_owned(),
            |e| matches!(e, PrometheusError::Query { error_type, .. } if error_type == "bad_data"),
            "rejected the query",
        ),
        (
            "a server answering garbage",
            source(&garbage),
            selector.clone(),
            |e| matches!(e, PrometheusError::BadJson { .. }),
            "not Prometheus API JSON",
        ),
        (
            "a proxy's error page",
            source(&proxy),
            selector.clone(),
            |e| matches!(e, PrometheusError::Status { status: 502, .. }),
            "HTTP 502",
        ),
        (
            "https",
            source("https://prometheus:9090"),
            selector.clone(),
            |e| matches!(e, PrometheusError::Url { .. }),
            "https is not supported",
        ),
        (
            "series without the pod label",
            wrong_label,
            r#"namespace="ml""#.to_owned(),
            |e| matches!(e, PrometheusError::MissingPodLabel { .. }),
            "lack the pod label \"kubernetes_pod_name\"",
        ),
    ];
    for (name, src, selector, is, says) in cases {
        let err = tokio::time::timeout(Duration::from_secs(20), tick(&src, &selector))
            .await
            .unwrap_or_else(|_| panic!("{name}: no answer in 20 s"))
            .expect_err(name);
        assert!(is(&err), "{name}: {err:?}");
        assert!(err.to_string().contains(says), "{name}: {err}");
    }
    drop(prom);
}
