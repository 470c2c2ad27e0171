//! What the operator costs the API server: requests counted at the local control plane's API
//! server, told apart from the test's own requests by the operator's User-Agent. The numbers
//! asserted here are the ones docs/operator.md states.

use inferpool_tests::apiserver::audit::Entry;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use super::*;

/// Requests for one changed pool, from the spec change until the pool is Ready again: one apply
/// of the Deployment, its Event, and a status write per rollout step the status shows.
const CHANGED_POOL_MAX: usize = 6;

fn by_operator(entries: Vec<Entry>) -> Vec<Entry> {
    entries.into_iter().filter(|e| e.agent == controller::USER_AGENT).collect()
}

fn show(entries: &[Entry]) -> Vec<String> {
    entries.iter().map(|e| format!("{} {}?{} -> {}", e.method, e.path, e.query, e.code)).collect()
}

#[tokio::test]
async fn a_changed_pool_costs_a_few_writes_and_no_reads() {
    let (cluster, operator, pools) = with_operator(Mode::Fake).await;
    let audit = &cluster.server.audit;
    let spec = json!({"autoscaling": {"enabled": false}, "replicas": {"count": 1}});
    pools.create(&PostParams::default(), &pool("counted", spec)).await.unwrap();
    wait_for(&pools, "counted", "Ready", has_condition("Ready", "True")).await;

    let mark = audit.mark();
    let scale = json!({"spec": {"replicas": {"count": 2}}});
    pools.patch("counted", &PatchParams::default(), &Patch::Merge(&scale)).await.unwrap();
    wait_for(&pools, "counted", "Ready with 2 replicas", |p: Option<&InferencePool>| {
        has_condition("Ready", "True")(p) && p.and_then(|p| p.status.as_ref()).is_some_and(|s| s.ready_replicas == 2)
    })
    .await;
    // One more reconcile that starts after the rollout settled, so nothing it sends is missed.
    let settled = operator.reconciles();
    let touch = json!({"metadata": {"annotations": {"example.com/touched": "yes"}}});
    pools.patch("counted", &PatchParams::default(), &Patch::Merge(&touch)).await.unwrap();
    operator.reconciled(settled + 1).await;

    let sent = by_operator(audit.since(mark));
    let writes: Vec<&Entry> = sent.iter().filter(|e| !e.is_watch()).collect();
    let shown = show(&sent);
    eprintln!("one changed pool, spec change to Ready: {} requests: {shown:#?}", writes.len());
    assert!(!sent.is_empty(), "no request from the operator was seen: is its User-Agent set?");
    assert!(
        writes.len() <= CHANGED_POOL_MAX,
        "{} requests, documented at most {CHANGED_POOL_MAX}: {shown:#?}",
        writes.len()
    );
    assert!(writes.iter().all(|e| e.method != http::Method::GET), "reads that the caches answer: {shown:#?}");
    let applies = |path_end: &str| {
        writes.iter().filter(|e| e.method == http::Method::PATCH && e.path.ends_with(path_end)).count()
    };
    assert_eq!(applies("/deployments/counted"), 1, "{shown:#?}");
    for unchanged in ["/services/counted", "/configmaps/counted-tuning", "/poddisruptionbudgets/counted"] {
        assert_eq!(applies(unchanged), 0, "{unchanged} did not change: {shown:#?}");
    }
    assert!(applies("/inferencepools/counted/status") >= 1, "{shown:#?}");
}

#[tokio::test]
async fn an_unchanged_pool_costs_nothing_and_a_restart_only_its_applies() {
    let cluster = cluster(Mode::Fake).await;
    let audit = &cluster.server.audit;
    let pools: Api<InferencePool> = Api::namespaced(cluster.client.clone(), NS);
    let first = Operator::start(&cluster.url, "op-0", None);
    pools.create(&PostParams::default(), &pool("idle", json!({"autoscaling": {"enabled": false}}))).await.unwrap();
    wait_for(&pools, "idle", "Ready", has_condition("Ready", "True")).await;

    // A change that is not the spec (an annotation) makes a reconcile that has nothing to write.
    // A pool that just became Ready may still have reconciles queued from the watch events of its
    // rollout (each started from what the caches held then); they finish within the first
    // touches. From then on every touch costs nothing: two in a row must, within five touches.
    let mut quiet = 0;
    let mut costs = Vec::new();
    for n in 0..5 {
        let settled = first.reconciles();
        let mark = audit.mark();
        let touch = json!({"metadata": {"annotations": {"example.com/touched": n.to_string()}}});
        pools.patch("idle", &PatchParams::default(), &Patch::Merge(&touch)).await.unwrap();
        first.reconciled(settled + 1).await;
        let sent: Vec<Entry> = by_operator(audit.since(mark)).into_iter().filter(|e| !e.is_watch()).collect();
        quiet = if sent.is_empty() { quiet + 1 } else { 0 };
        costs.push(show(&sent));
        if quiet == 2 {
            break;
        }
    }
    assert_eq!(quiet, 2, "an unchanged pool kept costing requests, per touch: {costs:#?}");
    drop(first);

    // A restarted operator knows nothing of its earlier writes: it applies each child once (no
    // change results), creates the admin Secret once more (answered 409: it is there; the token
    // is derived, so nothing is read back), and reads nothing.
    let mark = audit.mark();
    let second = Operator::start(&cluster.url, "op-1", None);
    second.reconciled(1).await;
    let sent: Vec<Entry> = by_operator(audit.since(mark)).into_iter().filter(|e| !e.is_watch()).collect();
    let shown = show(&sent);
    let patches = sent.iter().filter(|e| e.method == http::Method::PATCH).count();
    let read =
        |path_end: &str| sent.iter().filter(|e| e.method == http::Method::GET && e.path.ends_with(path_end)).count();
    let secret_creates = sent.iter().filter(|e| e.method == http::Method::POST && e.path.ends_with("/secrets")).count();
    eprintln!("a restarted operator's first reconcile of an unchanged pool: {shown:#?}");
    for cached in [
        "/deployments/idle",
        "/services/idle",
        "/configmaps/idle-tuning",
        "/poddisruptionbudgets/idle",
        "/namespaces/default/pods",
    ] {
        assert_eq!(read(cached), 0, "{cached} was read although a cache holds it: {shown:#?}");
    }
    assert_eq!(read("/secrets/idle-admin"), 0, "the admin Secret was read: {shown:#?}");
    assert_eq!((patches, secret_creates), (4, 1), "{shown:#?}");
}
