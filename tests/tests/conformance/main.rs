//! kube-rs's client and watcher against the API server double. This file holds the basics
//! (CRUD, subresources, garbage collection, watch, discovery) and the helpers; each module next to
//! it covers one feature.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod apply;
mod deletion;
mod schema;
mod selectors;
mod state;
mod watch;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use inferpool_tests::apiserver::ApiServer;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use serde_json::json;

pub async fn start() -> (ApiServer, Client) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ApiServer::start(listener).unwrap();
    let config = Config::new(server.url().parse().unwrap());
    (server, Client::try_from(config).unwrap())
}

pub fn config_map(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "data": {"k": "v"},
    }))
    .unwrap()
}

pub fn api_error(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn create_get_list_replace_patch_delete() {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let created = api.create(&PostParams::default(), &config_map("a", &[("app", "x")])).await.unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some() && meta.resource_version.is_some());
    api.create(&PostParams::default(), &config_map("b", &[("app", "y")])).await.unwrap();

    let again = api.create(&PostParams::default(), &config_map("a", &[])).await.unwrap_err();
    assert_eq!(api_error(again), (409, "AlreadyExists".into()));
    assert_eq!(api.get("a").await.unwrap().data.unwrap()["k"], "v");
    let missing = api.get("nope").await.unwrap_err();
    assert_eq!(api_error(missing), (404, "NotFound".into()));
    assert!(api.get_opt("nope").await.unwrap().is_none());

    let selected = api.list(&ListParams::default().labels("app=x")).await.unwrap();
    assert_eq!(selected.items.iter().map(|c| c.metadata.name.clone().unwrap()).collect::<Vec<_>>(), ["a"]);
    let by_name = api.list(&ListParams::default().fields("metadata.name=b")).await.unwrap();
    assert_eq!(by_name.items.len(), 1);
    assert_eq!(api.list(&ListParams::default().labels("app!=x")).await.unwrap().items.len(), 1);

    // Replace based on what was read works once; the second write with the same version conflicts.
    let mut current = api.get("a").await.unwrap();
    current.data.as_mut().unwrap().insert("k".into(), "w".into());
    api.replace("a", &PostParams::default(), &current).await.unwrap();
    let stale = api.replace("a", &PostParams::default(), &current).await.unwrap_err();
    assert_eq!(api_error(stale), (409, "Conflict".into()));

    let patched = api.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"n": "1"}}))).await.unwrap();
    assert_eq!(patched.data.unwrap().len(), 2);
    let applied = api
        .patch(
            "c",
            &PatchParams::apply("inferpool-operator").force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}
            })),
        )
        .await
        .unwrap();
    assert_eq!(applied.data.unwrap()["a"], "1", "apply creates what is missing");

    api.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(api.get_opt("a").await.unwrap().is_none());
}

#[tokio::test]
async fn status_is_a_separate_subresource_and_generation_follows_the_spec() {
    let (_server, client) = start().await;
    let api: Api<Deployment> = Api::namespaced(client, "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "d"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}}},
    }))
    .unwrap();
    api.create(&PostParams::default(), &d).await.unwrap();
    let status = json!({"apiVersion": "apps/v1", "kind": "Deployment", "status": {"replicas": 1, "readyReplicas": 1}});
    let after = api.patch_status("d", &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
    assert_eq!(after.status.unwrap().ready_replicas, Some(1));
    assert_eq!(after.metadata.generation, Some(1), "a status write is not a spec change");

    // A write to the main resource cannot change the status.
    let sneaky = json!({"status": {"readyReplicas": 5}, "metadata": {"labels": {"l": "1"}}});
    let after = api.patch("d", &PatchParams::default(), &Patch::Merge(sneaky)).await.unwrap();
    assert_eq!(after.status.unwrap().ready_replicas, Some(1));
    assert_eq!(after.metadata.generation, Some(1), "a label change is not a spec change");
    let after = api.patch("d", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}}))).await.unwrap();
    assert_eq!(after.metadata.generation, Some(2));

    // The scale subresource reads and writes spec.replicas (what kubectl scale and an HPA use).
    let scale = api.get_scale("d").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(3));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("a=b"));
    let scaled =
        api.patch_scale("d", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 5}}))).await.unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(5));
    let d = api.get("d").await.unwrap();
    assert_eq!((d.spec.replicas, d.metadata.generation), (Some(5), Some(3)));
    let bad = api
        .patch_scale("d", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": -1}})))
        .await
        .unwrap_err();
    assert_eq!(api_error(bad), (422, "Invalid".into()));
}

#[tokio::test]
async fn owners_take_their_dependents_and_finalizers_hold_deletion() {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let owner = api.create(&PostParams::default(), &config_map("owner", &[])).await.unwrap();
    let mut child = config_map("child", &[]);
    child.metadata.owner_references = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.metadata.uid.clone().unwrap(),
        ..Default::default()
    }]);
    api.create(&PostParams::default(), &child).await.unwrap();
    let mut held = config_map("held", &[]);
    held.metadata.finalizers = Some(vec!["inferpool.dev/cleanup".into()]);
    api.create(&PostParams::default(), &held).await.unwrap();

    api.delete("owner", &DeleteParams::default()).await.unwrap();
    assert!(api.get_opt("child").await.unwrap().is_none(), "the dependent was collected");

    api.delete("held", &DeleteParams::default()).await.unwrap();
    let pending = api.get("held").await.unwrap();
    assert!(pending.metadata.deletion_timestamp.is_some());
    api.patch("held", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
    assert!(api.get_opt("held").await.unwrap().is_none(), "gone once its last finalizer is");
}

#[tokio::test]
async fn the_watcher_sees_changes_and_relists_after_410() {
    let (server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &config_map("before", &[])).await.unwrap();
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    let mut seen = Vec::new();
    let mut created_after = false;
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.next().await {
            match e.unwrap() {
                watcher::Event::InitDone if !created_after => {
                    created_after = true;
                    api.create(&PostParams::default(), &config_map("after", &[])).await.unwrap();
                }
                watcher::Event::InitApply(c) | watcher::Event::Apply(c) => {
                    seen.push(c.metadata.name.unwrap());
                    if seen.contains(&"after".to_owned()) {
                        break;
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(seen, ["before", "after"]);

    // After the history has moved on, a watch from an old version is answered 200 with one
    // ERROR event carrying a 410 Status: the form kube-rs turns into a re-list.
    let cm = inferpool_tests::apiserver::resources::find("", "v1", "configmaps").unwrap();
    for i in 0..4200 {
        server.store.create(cm, "other", json!({"metadata": {"name": format!("n{i}")}})).unwrap();
    }
    let url = format!("{}/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=2", server.url());
    let body = raw_get(&url).await;
    let event: serde_json::Value = serde_json::from_str(body.lines().next().unwrap()).unwrap();
    assert_eq!((event["type"].as_str(), event["object"]["code"].as_u64()), (Some("ERROR"), Some(410)), "{body}");
    assert_eq!(event["object"]["reason"], "Expired");
}

/// GETs a URL over plain HTTP/1.1 and returns the body (the server closes an ended watch).
pub async fn raw_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let req = format!("GET /{path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Chunked: keep the JSON lines only.
    body.lines().filter(|l| l.starts_with('{')).collect::<Vec<_>>().join("\n")
}

#[tokio::test]
async fn discovery_lists_every_served_resource() {
    let (_server, client) = start().await;
    let core = client.list_core_api_resources("v1").await.unwrap();
    assert!(core.resources.iter().any(|r| r.name == "pods" && r.namespaced));
    let groups = client.list_api_groups().await.unwrap();
    let names: Vec<_> = groups.groups.iter().map(|g| g.name.as_str()).collect();
    for group in ["apps", "inferpool.dev", "coordination.k8s.io", "discovery.k8s.io", "policy", "events.k8s.io"] {
        assert!(names.contains(&group), "{group} missing from {names:?}");
    }
    let pools = client.list_api_group_resources("inferpool.dev/v1alpha1").await.unwrap();
    let pool_names: Vec<_> = pools.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(pool_names, ["inferencepools", "inferencepools/status", "inferencepools/scale"]);
    let version = client.apiserver_version().await.unwrap();
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "37"));
}

/// The full API error (Status with details) of a failed call.
pub fn api_status(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("not an API error: {other}"),
    }
}

/// Sends a raw request through kube's client (for what its typed API cannot express) and
/// returns the error Status, if any.
pub async fn raw(
    client: &Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<String, kube::Error> {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(body.as_bytes().to_vec())
        .unwrap();
    client.request_text(req).await
}

#[tokio::test]
async fn secret_string_data_is_stored_as_data() {
    let (_server, client) = start().await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, "default");
    let secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "token"}, "stringData": {"token": "s3cret"}, "data": {"other": "eA=="},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let stored = secrets.get("token").await.unwrap();
    assert!(stored.string_data.is_none(), "stringData is write-only");
    let data = stored.data.unwrap();
    assert_eq!(data["token"].0, b"s3cret");
    assert_eq!(data["other"].0, b"x");
}
