use super::*;

const SEL: &str = r#"namespace="ml",pod=~"faces-.*""#;

fn query() -> Query<'static> {
    Query { selector: SEL, pod_label: "pod", window_seconds: 8 }
}

fn source(selector: Option<&str>) -> PrometheusSource {
    PrometheusSource {
        url: "http://prometheus:9090".to_owned(),
        selector: selector.map(str::to_owned),
        pod_label: "pod".to_owned(),
        scrape_interval_seconds: 15,
    }
}

#[test]
fn every_query_text() {
    let q = query();
    let cases = [
        (Figure::Up, r#"max by (pod) (up{namespace="ml",pod=~"faces-.*"})"#),
        (
            Figure::Rps,
            r#"sum by (pod) (rate(inferpool_requests_total{namespace="ml",pod=~"faces-.*",route=~"embed|match|scan|profiles"}[8s]))"#,
        ),
        (
            Figure::Requests,
            r#"sum by (pod) (increase(inferpool_requests_total{namespace="ml",pod=~"faces-.*",route=~"embed|match|scan|profiles"}[8s]))"#,
        ),
        (
            Figure::ErrorRate,
            concat!(
                r#"sum by (pod) (rate(inferpool_requests_total{namespace="ml",pod=~"faces-.*",route=~"embed|match|scan|profiles",code=~"5..|429"}[8s]))"#,
                r#" / sum by (pod) (rate(inferpool_requests_total{namespace="ml",pod=~"faces-.*",route=~"embed|match|scan|profiles"}[8s]))"#
            ),
        ),
        (
            Figure::P95,
            r#"histogram_quantile(0.95, sum by (pod, le) (rate(inferpool_request_duration_seconds_bucket{namespace="ml",pod=~"faces-.*",route=~"embed|match|scan|profiles"}[8s]))) * 1000"#,
        ),
        (
            Figure::QueueWaitP95,
            r#"histogram_quantile(0.95, sum by (pod, le) (rate(inferpool_queue_wait_seconds_bucket{namespace="ml",pod=~"faces-.*"}[8s]))) * 1000"#,
        ),
        (
            Figure::InferenceP95,
            r#"histogram_quantile(0.95, sum by (pod, le) (rate(inferpool_inference_duration_seconds_bucket{namespace="ml",pod=~"faces-.*"}[8s]))) * 1000"#,
        ),
        (
            Figure::MeanBatchSize,
            r#"sum by (pod) (rate(inferpool_batch_size_sum{namespace="ml",pod=~"faces-.*"}[8s])) / sum by (pod) (rate(inferpool_batch_size_count{namespace="ml",pod=~"faces-.*"}[8s]))"#,
        ),
        (
            Figure::CacheHitRate,
            r#"sum by (pod) (rate(inferpool_cache_requests_total{namespace="ml",pod=~"faces-.*",result="hit"}[8s])) / sum by (pod) (rate(inferpool_cache_requests_total{namespace="ml",pod=~"faces-.*",tier="memory"}[8s]))"#,
        ),
        (Figure::QueueDepth, r#"max by (pod) (inferpool_queue_depth{namespace="ml",pod=~"faces-.*"})"#),
        (Figure::Rss, r#"max by (pod) (inferpool_resident_memory_bytes{namespace="ml",pod=~"faces-.*"})"#),
        (Figure::TuningGeneration, r#"max by (pod) (inferpool_tuning_generation{namespace="ml",pod=~"faces-.*"})"#),
    ];
    assert_eq!(cases.len(), Figure::ALL.len(), "every figure has a case");
    for (figure, want) in cases {
        assert_eq!(q.promql(figure), want, "{figure:?}");
    }
}

#[test]
fn an_empty_selector_leaves_no_stray_comma_and_the_pod_label_is_configurable() {
    let q = Query { selector: " ", pod_label: "kubernetes_pod_name", window_seconds: 30 };
    assert_eq!(q.promql(Figure::QueueDepth), "max by (kubernetes_pod_name) (inferpool_queue_depth{})");
    assert_eq!(
        q.promql(Figure::Rps),
        r#"sum by (kubernetes_pod_name) (rate(inferpool_requests_total{route=~"embed|match|scan|profiles"}[30s]))"#
    );
}

#[test]
fn default_selector_names_namespace_and_pool_pods() {
    assert_eq!(selector(&source(None), "ml", "faces"), r#"namespace="ml",pod=~"faces-.*""#);
    assert_eq!(selector(&source(Some(r#"job="x""#)), "ml", "faces"), r#"job="x""#);
}

#[test]
fn window_spans_four_scrapes() {
    assert_eq!(window_seconds(Duration::from_secs(1)), 4);
    assert_eq!(window_seconds(Duration::from_secs(15)), 60);
    assert_eq!(window_seconds(Duration::from_millis(1500)), 8);
    assert_eq!(window_seconds(Duration::ZERO), 2);
}

#[test]
fn urls_must_be_plain_http() {
    assert_eq!(base_url("http://prom:9090/").unwrap(), "http://prom:9090");
    assert_eq!(base_url("http://prom:9090/prometheus").unwrap(), "http://prom:9090/prometheus");
    for url in ["https://prom:9090", "prom:9090", "http://prom:9090/?x=1", "http://bad host/"] {
        assert!(matches!(base_url(url), Err(PrometheusError::Url { .. })), "{url}");
    }
}

#[test]
fn query_values_are_percent_encoded() {
    assert_eq!(
        encode(r#"sum by (pod) (up{a=~"x.*"})[8s]"#),
        "sum%20by%20%28pod%29%20%28up%7Ba%3D~%22x.%2A%22%7D%29%5B8s%5D"
    );
    assert_eq!(encode("a+b/c"), "a%2Bb%2Fc");
}

fn series(pod: &str, value: &str) -> (BTreeMap<String, String>, String) {
    (BTreeMap::from([("pod".to_owned(), pod.to_owned())]), value.to_owned())
}

fn answer(figure: Figure, values: &[(&str, &str)]) -> (Figure, String, Vector) {
    (figure, format!("{figure:?}"), values.iter().map(|(p, v)| series(p, v)).collect())
}

#[test]
fn assembles_one_pod_sample_per_pod() {
    let answers = vec![
        answer(Figure::Up, &[("faces-b", "1"), ("faces-a", "1"), ("faces-c", "0")]),
        answer(Figure::Rps, &[("faces-a", "12.5"), ("faces-c", "3")]),
        answer(Figure::Requests, &[("faces-a", "99.6")]),
        answer(Figure::ErrorRate, &[("faces-a", "0.01")]),
        // An idle pod's quantile is NaN: it counts as 0.
        answer(Figure::P95, &[("faces-a", "42.5"), ("faces-b", "NaN")]),
        answer(Figure::CacheHitRate, &[("faces-a", "0.75")]),
        answer(Figure::QueueDepth, &[("faces-a", "3")]),
        answer(Figure::TuningGeneration, &[("faces-a", "7"), ("faces-b", "6")]),
        answer(Figure::Rss, &[]),
    ];
    let sample = assemble("pod", answers, 12.0).unwrap();
    assert_eq!(sample.at, 12.0);
    assert_eq!(sample.silent, 1, "up == 0 is silent, not idle");
    assert_eq!(sample.starting, 0);
    let a = &sample.pods[0];
    assert_eq!(
        *a,
        PodSample {
            pod: "faces-a".to_owned(),
            rps: 12.5,
            error_rate: 0.01,
            requests: 100,
            p95_ms: 42.5,
            queue_wait_p95_ms: 0.0,
            inference_p95_ms: 0.0,
            mean_batch_size: 0.0,
            cache_hit_rate: 0.75,
            queue_depth: 3,
            rss_bytes: 0,
            tuning_generation: 7,
            cache_lookups: 100,
        }
    );
    let b = &sample.pods[1];
    assert_eq!((b.pod.as_str(), b.rps, b.p95_ms, b.tuning_generation), ("faces-b", 0.0, 0.0, 6));
    assert_eq!(sample.pods.len(), 2);
}

#[test]
fn a_pod_without_up_still_counts_when_it_has_series() {
    let sample = assemble("pod", vec![answer(Figure::Rps, &[("faces-a", "1")])], 0.0).unwrap();
    assert_eq!(sample.pods.len(), 1);
    assert_eq!(sample.silent, 0);
}

#[test]
fn series_without_the_pod_label_are_an_error() {
    let answers = vec![(Figure::Up, "up".to_owned(), vec![(BTreeMap::new(), "1".to_owned())])];
    let err = assemble("pod", answers, 0.0).unwrap_err();
    assert!(matches!(&err, PrometheusError::MissingPodLabel { label, .. } if label == "pod"), "{err}");
    assert!(err.to_string().contains("relabel"), "{err}");
}

#[test]
fn infinite_or_unreadable_values_are_an_error() {
    for value in ["+Inf", "-Inf", "lots"] {
        let err = assemble("pod", vec![answer(Figure::P95, &[("faces-a", value)])], 0.0).unwrap_err();
        assert!(matches!(&err, PrometheusError::NotFinite { pod, .. } if pod == "faces-a"), "{value}: {err}");
    }
}

#[test]
fn parses_a_vector() {
    let body = br#"{"status":"success","data":{"resultType":"vector","result":[
        {"metric":{"pod":"faces-a"},"value":[1700000000.123,"2.5"]},
        {"metric":{"pod":"faces-b"},"value":[1700000000.123,"NaN"]}]}}"#;
    let v = parse("http://p", "q", StatusCode::OK, body).unwrap();
    assert_eq!(v, vec![series("faces-a", "2.5"), series("faces-b", "NaN")]);
}

#[test]
fn answers_that_are_not_a_vector_are_typed_errors() {
    let q = "sum(up)";
    let promql_error = br#"{"status":"error","errorType":"bad_data","error":"1:9: parse error: unexpected \"}\""}"#;
    let err = parse("http://p", q, StatusCode::BAD_REQUEST, promql_error).unwrap_err();
    assert!(
        matches!(&err, PrometheusError::Query { error_type, error, .. } if error_type == "bad_data" && error.contains("parse error")),
        "{err}"
    );
    let err = parse("http://p", q, StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>").unwrap_err();
    assert!(matches!(&err, PrometheusError::Status { status: 502, body, .. } if body.contains("bad gateway")), "{err}");
    for garbage in [
        &b"hello"[..],
        br#"{"status":"success"}"#,
        br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{}}]}}"#,
    ] {
        let err = parse("http://p", q, StatusCode::OK, garbage).unwrap_err();
        assert!(matches!(err, PrometheusError::BadJson { .. }), "{err}");
    }
    let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"1"]}}"#;
    let err = parse("http://p", q, StatusCode::OK, scalar).unwrap_err();
    assert!(err.to_string().contains("scalar instead of an instant vector"), "{err}");
}

#[test]
fn long_bodies_are_cut_in_messages() {
    let body = "x".repeat(1000);
    assert_eq!(quote(body.as_bytes()).len(), QUOTE_LIMIT + 3);
}
