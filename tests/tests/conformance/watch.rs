//! Watch bookmarks, `timeoutSeconds`, and streaming lists (`sendInitialEvents=true`).

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::Value;

use super::{config_map, raw_get, start};

fn events(body: &str) -> Vec<Value> {
    body.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn streaming_lists_end_with_an_initial_events_bookmark() {
    let (server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &config_map(name, &[])).await.unwrap();
    }
    // What the server sends: ADDED for each object, then the bookmark that ends the list.
    let url = format!(
        "{}/api/v1/namespaces/default/configmaps?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0&allowWatchBookmarks=true&timeoutSeconds=1",
        server.url()
    );
    let got = events(&raw_get(&url).await);
    let types: Vec<_> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types[..3], ["ADDED", "ADDED", "BOOKMARK"], "{got:?}");
    let end = &got[2]["object"];
    assert_eq!(end["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
    assert_eq!((end["kind"].as_str(), end["apiVersion"].as_str()), (Some("ConfigMap"), Some("v1")));

    // kube-runtime's streaming-list watcher: initial objects, InitDone, then live changes.
    let mut stream = watcher(api.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = stream.next().await {
            match e.unwrap() {
                watcher::Event::InitApply(c) => seen.push(format!("init {}", c.name_any())),
                watcher::Event::InitDone => {
                    seen.push("done".into());
                    api.create(&PostParams::default(), &config_map("c", &[])).await.unwrap();
                }
                watcher::Event::Apply(c) => {
                    seen.push(format!("live {}", c.name_any()));
                    break;
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(seen, ["init a", "init b", "done", "live c"]);
}

#[tokio::test]
async fn a_bookmark_comes_before_the_server_ends_a_watch() {
    let (server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let created = api.create(&PostParams::default(), &config_map("a", &[])).await.unwrap();
    let rv = created.resource_version().unwrap();
    let base = format!(
        "{}/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}&timeoutSeconds=1",
        server.url()
    );

    // Another namespace's change moves the version on without an event for this watch.
    let other: Api<ConfigMap> = Api::namespaced(api.into_client(), "other");
    let moved = other.create(&PostParams::default(), &config_map("x", &[])).await.unwrap();
    let got = events(&raw_get(&format!("{base}&allowWatchBookmarks=true")).await);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["type"], "BOOKMARK");
    let object = &got[0]["object"];
    assert_eq!(object["metadata"], serde_json::json!({"resourceVersion": moved.resource_version().unwrap()}));
    assert_eq!(object["kind"], "ConfigMap");

    // Without allowWatchBookmarks the stream just ends at the timeout.
    assert_eq!(raw_get(&base).await, "");
}
