//! The operator's permissions come from the Helm chart, and the chart grants nothing the operator
//! does not use. Every test in this binary runs the operator under the chart's rendered
//! ClusterRole and leader-election Role (the API server double answers anything else with 403,
//! like a cluster), so a missing verb fails whichever test needs it; the scenario here goes
//! through every path that touches the API (children, status, the admin Secret, Events and their
//! series, leader election, replacing a failing pod) and checks the other direction: each granted
//! verb was used.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use bytes::Bytes;
use inferpool_tests::apiserver::rbac::{Permission, Rbac, Rule};
use kube::api::{Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::json;

use super::*;

/// Who the chart's RoleBindings name (the release's ServiceAccount), for `Forbidden` messages.
const USER: &str = "system:serviceaccount:inferpool-system:inferpool";

#[derive(Deserialize)]
struct Chart {
    cluster: Vec<ChartRule>,
    leader: Leader,
}

#[derive(Deserialize)]
struct Leader {
    rules: Vec<ChartRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChartRule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    #[serde(default)]
    resource_names: Vec<String>,
}

/// The chart's rules for the operator, rendered by Helm (charts/tests/operator_rbac.py, in the
/// venv `make setup` builds). The leader-election Role lives in the operator's namespace, which
/// is where these tests keep the Lease.
fn chart_rules() -> Vec<Rule> {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES
        .get_or_init(|| {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let python = root.join(".cache/venv/bin/python");
            let out = std::process::Command::new(&python)
                .arg(root.join("charts/tests/operator_rbac.py"))
                .output()
                .unwrap_or_else(|e| panic!("{}: {e} (run `make setup`)", python.display()));
            assert!(out.status.success(), "rendering the chart's RBAC: {}", String::from_utf8_lossy(&out.stderr));
            let chart: Chart = serde_json::from_slice(&out.stdout).unwrap();
            let rule = |namespace: Option<&str>, r: ChartRule| Rule {
                namespace: namespace.map(str::to_owned),
                groups: r.api_groups,
                resources: r.resources,
                verbs: r.verbs,
                names: r.resource_names,
            };
            let cluster = chart.cluster.into_iter().map(|r| rule(None, r));
            cluster.chain(chart.leader.rules.into_iter().map(|r| rule(Some(NS), r))).collect()
        })
        .clone()
}

/// The chart's rules, enforced on the operator's requests.
pub fn operator_rbac() -> Rbac {
    Rbac::new(controller::USER_AGENT, USER, chart_rules())
}

/// Every (group, resource, verb) the rules grant.
fn granted(rules: &[Rule]) -> BTreeSet<Permission> {
    let mut all = BTreeSet::new();
    for rule in rules {
        for group in &rule.groups {
            for resource in &rule.resources {
                for verb in &rule.verbs {
                    all.insert(Permission { group: group.clone(), resource: resource.clone(), verb: verb.clone() });
                }
            }
        }
    }
    all
}

fn show(permissions: &BTreeSet<Permission>) -> Vec<String> {
    permissions.iter().map(|p| format!("{} {}/{}", p.verb, p.group, p.resource)).collect()
}

/// One embedding request; its status. A replica answers a zero deadline before reading the body
/// and then closes the connection, so the client keeps no idle connections to reuse.
async fn send(http: &autoscale::reqwest_like::Http, ip: &str, deadline_ms: Option<u64>) -> u16 {
    use http_body_util::{BodyExt, Full};
    let photo = inferpool_tests::fixtures::photo("chelsea.png").unwrap();
    let mut request = http::Request::post(format!("http://{ip}:8080/api/v1/embed")).header("content-type", "image/png");
    if let Some(ms) = deadline_ms {
        request = request.header("x-deadline-ms", ms.to_string());
    }
    let response = http.request(request.body(Full::new(Bytes::from(photo))).unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    status
}

#[tokio::test]
async fn the_chart_grants_the_operator_exactly_what_it_uses() {
    let cluster = cluster(Mode::Process { sidecar: sidecar_bin() }).await;
    let _operator = Operator::start(&cluster.url, "op-0", Some(5));
    let pools: Api<InferencePool> = Api::namespaced(cluster.client.clone(), NS);
    let spec = autoscale::two_tuned_replicas();
    pools.create(&PostParams::default(), &pool("guarded", spec)).await.unwrap();
    wait_for(&pools, "guarded", "Ready", has_condition("Ready", "True")).await;

    // The same change twice: the second "Updated ConfigMap" Event becomes a series (a patch).
    for batch in [8, 16, 8] {
        let patch = json!({"spec": {"batching": {"maxBatchSize": batch}}});
        pools.patch("guarded", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        let config_maps: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), NS);
        wait_for(&config_maps, "guarded-tuning", "the new batch size", |cm: Option<&ConfigMap>| {
            cm.and_then(|c| c.data.as_ref()?.get("INFERPOOL_MAX_BATCH")).map(String::as_str)
                == Some(batch.to_string().as_str())
        })
        .await;
    }

    // One replica fails every request (a zero deadline is answered 504 at once), the other
    // serves: the autoscaler replaces the failing one, which is the operator's only pod delete.
    let replicas = pods(&cluster.client, "guarded").await;
    let ip = |pod: &Pod| pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
    let (failing, serving) = (ip(&replicas[0]), ip(&replicas[1]));
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    for _ in 0..60 {
        assert_eq!(send(&http, &failing, Some(0)).await, 504);
    }
    for _ in 0..20 {
        assert_eq!(send(&http, &serving, None).await, 200);
    }
    let pod_api: Api<Pod> = Api::namespaced(cluster.client.clone(), NS);
    wait_gone(&pod_api, &replicas[0].name_any()).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(cluster.client.clone(), NS);
    let reasons: Vec<String> =
        events.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect();
    assert!(reasons.iter().any(|r| r == "PodReplaced"), "{reasons:?}");

    let rbac = cluster.server.rbac.as_ref().expect("the operator's RBAC is enforced");
    let forbidden: Vec<String> = cluster
        .server
        .audit
        .since(0)
        .into_iter()
        .filter(|e| e.agent == controller::USER_AGENT && e.code == 403)
        .map(|e| format!("{} {}", e.method, e.path))
        .collect();
    assert!(forbidden.is_empty(), "the chart does not grant: {forbidden:#?}");
    let (used, granted) = (rbac.used(), granted(&chart_rules()));
    let unused: BTreeSet<Permission> = granted.difference(&used).cloned().collect();
    eprintln!("the operator used {:#?}", show(&used));
    assert!(unused.is_empty(), "granted but never used: {:#?}", show(&unused));
}
