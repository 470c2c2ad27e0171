//! Deletion propagation: background (the default), foreground (dependents that block go first,
//! then the owner) and orphan (dependents lose the reference and stay); from the DeleteOptions
//! body or the query parameter.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{config_map, raw, start};

/// Creates `owner` and, for each `(name, block, finalizer)`, a dependent of it.
async fn family(api: &Api<ConfigMap>, owner: &str, dependents: &[(&str, bool, bool)]) {
    let o = api.create(&PostParams::default(), &config_map(owner, &[])).await.unwrap();
    for (name, block, finalizer) in dependents {
        let mut d = config_map(name, &[]);
        d.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: owner.into(),
            uid: o.uid().unwrap(),
            block_owner_deletion: Some(*block),
            ..Default::default()
        }]);
        if *finalizer {
            d.metadata.finalizers = Some(vec!["example.com/hold".into()]);
        }
        api.create(&PostParams::default(), &d).await.unwrap();
    }
}

async fn release(api: &Api<ConfigMap>, name: &str) {
    api.patch(name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.unwrap();
}

#[tokio::test]
async fn foreground_deletion_waits_for_blocking_dependents() {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    family(&api, "owner", &[("blocker", true, true), ("free", false, false)]).await;
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(events.next().await.unwrap().unwrap(), watcher::Event::InitDone) {}
    })
    .await
    .unwrap();

    api.delete("owner", &DeleteParams::foreground()).await.unwrap();
    let owner = api.get("owner").await.unwrap();
    assert!(owner.metadata.deletion_timestamp.is_some());
    assert!(owner.finalizers().contains(&"foregroundDeletion".to_owned()));
    assert!(api.get_opt("free").await.unwrap().is_none(), "dependents are deleted first");
    assert!(api.get("blocker").await.unwrap().metadata.deletion_timestamp.is_some(), "held by its finalizer");

    release(&api, "blocker").await;
    let order = tokio::time::timeout(Duration::from_secs(10), async {
        let mut order = Vec::new();
        while let Some(e) = events.next().await {
            if let watcher::Event::Delete(c) = e.unwrap() {
                order.push(c.name_any());
                if order.contains(&"owner".to_owned()) {
                    break;
                }
            }
        }
        order
    })
    .await
    .unwrap();
    assert_eq!(order, ["free", "blocker", "owner"], "dependents go first, the owner last");
    assert!(api.get_opt("owner").await.unwrap().is_none());
}

#[tokio::test]
async fn orphan_deletion_keeps_dependents() {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    family(&api, "owner", &[("kept", true, false)]).await;
    api.delete("owner", &DeleteParams::orphan()).await.unwrap();
    assert!(api.get_opt("owner").await.unwrap().is_none());
    let kept = api.get("kept").await.unwrap();
    assert!(kept.owner_references().is_empty(), "{:?}", kept.metadata.owner_references);

    // The query parameter works too (kubectl's --cascade=orphan sends it in the body; others in the query).
    family(&api, "owner2", &[("kept2", false, false)]).await;
    let path = "/api/v1/namespaces/default/configmaps/owner2?propagationPolicy=Orphan";
    raw(&client, "DELETE", path, "application/json", "").await.unwrap();
    assert!(api.get("kept2").await.unwrap().owner_references().is_empty());

    // Background (the default) takes the dependents along.
    family(&api, "owner3", &[("gone", false, false)]).await;
    api.delete("owner3", &DeleteParams::background()).await.unwrap();
    assert!(api.get_opt("gone").await.unwrap().is_none());

    let bad = raw(
        &client,
        "DELETE",
        "/api/v1/namespaces/default/configmaps/kept",
        "application/json",
        r#"{"propagationPolicy":"Sideways"}"#,
    );
    assert_eq!(super::api_error(bad.await.unwrap_err()).0, 400);
}

#[tokio::test]
async fn an_object_created_for_an_owner_already_gone_is_collected() {
    // A controller whose reconcile raced the owner's deletion applies a child that names it.
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut late = config_map("late-child", &[]);
    late.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "gone".into(),
        uid: "00000000-0000-4000-8000-00000000dead".into(),
        ..Default::default()
    }]);
    api.create(&PostParams::default(), &late).await.unwrap();
    assert!(api.get_opt("late-child").await.unwrap().is_none(), "a child of a deleted owner outlived it");
    // An object with a living owner stays.
    family(&api, "alive", &[("kept-child", false, false)]).await;
    assert!(api.get_opt("kept-child").await.unwrap().is_some());
}
