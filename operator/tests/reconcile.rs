//! What one reconcile sends to the API server, against a mock of it (tower-test).
//!
//! The mock answers like an empty cluster (children absent, applies echoed back with a
//! resourceVersion) and records every request, so the tests assert on what the operator asks for:
//! method, path and body fields, never on exact query strings.

mod support;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::Method;
use inferpool_operator::controller;
use serde_json::json;
use support::{admin_key, find, reconcile};

#[tokio::test]
async fn a_new_pool_gets_its_children_applied_and_a_status() {
    let (result, sent) = reconcile(json!({"replicas": {"min": 2}}), vec![]).await;
    assert!(result.is_ok(), "{result:?}");

    // The admin token Secret is created once (POST), never applied and never read: its token is
    // derived from the operator's key and the pool.
    let secret = find(&sent, &Method::POST, "/api/v1/namespaces/prod/secrets");
    assert_eq!(secret.body["metadata"]["name"], "shop-admin");
    let token = admin_key().token("prod", "shop", "0b6f1d6e-1111-2222-3333-444455556666");
    assert_eq!(secret.body["data"]["token"], BASE64.encode(token));
    assert!(!sent.iter().any(|s| s.path.contains("/secrets") && s.method != Method::POST), "{sent:#?}");

    // Every child is server-side applied by the operator's field manager, with force.
    for path in [
        "/apis/apps/v1/namespaces/prod/deployments/shop",
        "/api/v1/namespaces/prod/services/shop",
        "/api/v1/namespaces/prod/configmaps/shop-tuning",
        "/apis/policy/v1/namespaces/prod/poddisruptionbudgets/shop",
    ] {
        let apply = find(&sent, &Method::PATCH, path);
        assert_eq!(apply.content_type, "application/apply-patch+yaml", "{path}");
        assert!(apply.query.contains("fieldManager=inferpool-operator"), "{path}: {}", apply.query);
        assert!(apply.query.contains("force=true"), "{path}: {}", apply.query);
        let owner = &apply.body["metadata"]["ownerReferences"][0];
        assert_eq!((owner["kind"].as_str(), owner["name"].as_str()), (Some("InferencePool"), Some("shop")), "{path}");
        assert_eq!(owner["controller"], true, "{path}");
    }
    let deployment = &find(&sent, &Method::PATCH, "/deployments/shop").body;
    assert_eq!(deployment["spec"]["replicas"], 2, "autoscaling on: the floor of the range");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.local/inferpool/sidecar:test"
    );

    // Status: written through the status subresource, not ready yet, SLA unknown.
    let status = &find(&sent, &Method::PATCH, "/inferencepools/shop/status").body["status"];
    assert_eq!(status["desiredReplicas"], 2);
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["endpoint"], "http://shop.prod.svc:8080");
    assert!(status["selector"].as_str().is_some_and(|s| s.contains("app.kubernetes.io/instance=shop")));
    let condition = |t: &str| status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == t)).cloned();
    assert_eq!(condition("Ready").map(|c| c["status"].clone()), Some(json!("False")));
    assert_eq!(condition("Progressing").map(|c| c["status"].clone()), Some(json!("True")));
    assert_eq!(condition("Degraded").map(|c| c["status"].clone()), Some(json!("False")));
    assert_eq!(condition("SLACompliant").map(|c| c["status"].clone()), Some(json!("Unknown")));

    // Each created child is explained by an Event on the pool.
    let events: Vec<_> = sent.iter().filter(|s| s.method == Method::POST && s.path.ends_with("/events")).collect();
    assert!(events.len() >= 5, "expected an Event per created child, got {}", events.len());
    assert!(events.iter().all(|e| e.body["regarding"]["name"] == "shop"));
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_nothing_is_applied() {
    let (result, sent) = reconcile(json!({"replicas": {"min": 5, "max": 2}}), vec![]).await;
    let error = result.expect_err("invalid spec must fail the reconcile");
    assert!(error.contains("spec.replicas.min"), "{error}");
    assert!(!sent.iter().any(|s| s.method == Method::PATCH && !s.path.ends_with("/status")), "nothing applied");
    let status = &find(&sent, &Method::PATCH, "/inferencepools/shop/status").body["status"];
    let degraded = status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Degraded")).cloned();
    let degraded = degraded.unwrap_or_default();
    assert_eq!((degraded["status"].as_str(), degraded["reason"].as_str()), (Some("True"), Some("InvalidSpec")));
    assert!(degraded["message"].as_str().is_some_and(|m| m.contains("must not exceed max")));
    let warning = find(&sent, &Method::POST, "/events");
    assert_eq!(
        (warning.body["type"].as_str(), warning.body["reason"].as_str()),
        (Some("Warning"), Some("InvalidSpec"))
    );
}

#[tokio::test]
async fn manual_replicas_follow_the_count_the_scale_subresource_sets() {
    let spec = json!({"autoscaling": {"enabled": false}, "replicas": {"count": 4}});
    let (result, sent) = reconcile(spec, vec![]).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(find(&sent, &Method::PATCH, "/deployments/shop").body["spec"]["replicas"], 4);
}

#[tokio::test]
async fn an_existing_admin_secret_is_never_replaced() {
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "shop-admin", "namespace": "prod", "resourceVersion": "3"},
                        "data": {"token": "c2VjcmV0"}});
    let existing = vec![("/api/v1/namespaces/prod/secrets/shop-admin".to_owned(), secret)];
    let (result, sent) = reconcile(json!({}), existing).await;
    assert!(result.is_ok(), "{result:?}");
    // One create, answered 409, and nothing else: no read, no rewrite.
    let to_secrets: Vec<&Method> = sent.iter().filter(|s| s.path.contains("/secrets")).map(|s| &s.method).collect();
    assert_eq!(to_secrets, [&Method::POST], "{sent:#?}");
}

#[test]
fn transient_errors_back_off_exponentially_with_jitter_up_to_a_cap() {
    for (attempt, base) in [(1, 500), (2, 1000), (3, 2000), (4, 4000)] {
        let base = Duration::from_millis(base);
        for _ in 0..20 {
            let delay = controller::backoff(attempt);
            assert!(delay >= base && delay < base * 2, "attempt {attempt}: {delay:?} outside [{base:?}, 2x)");
        }
    }
    assert_eq!(controller::backoff(20), Duration::from_secs(300));
    // Pools that failed together retry at different times.
    let first: std::collections::BTreeSet<Duration> = (0..20).map(|_| controller::backoff(1)).collect();
    assert!(first.len() > 1, "no jitter: {first:?}");
}
