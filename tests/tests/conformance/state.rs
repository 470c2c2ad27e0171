//! State files: objects and resourceVersions survive a restart; a corrupt file is an error.

use std::time::Duration;

use inferpool_tests::apiserver::ApiServer;
use inferpool_tests::apiserver::persist::Saver;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::{Api, Client, Config, ResourceExt};

use super::config_map;

async fn serve() -> (ApiServer, Api<ConfigMap>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ApiServer::start(listener).unwrap();
    let client = Client::try_from(Config::new(server.url().parse().unwrap())).unwrap();
    (server, Api::namespaced(client, "default"))
}

#[tokio::test]
async fn objects_and_versions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");

    let (server, api) = serve().await;
    let saver = Saver::start(server.store.clone(), path.clone()).unwrap();
    let a = api.create(&PostParams::default(), &config_map("a", &[("k", "v")])).await.unwrap();
    // Saved a second after a change, without waiting for shutdown.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !std::fs::read_to_string(&path).is_ok_and(|s| s.contains("\"a\"")) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the state file is written after a change");
    let b = api.create(&PostParams::default(), &config_map("b", &[])).await.unwrap();
    saver.finish().unwrap();
    drop(server);

    let (server, api) = serve().await;
    let _saver = Saver::start(server.store.clone(), path.clone()).unwrap();
    let (a2, b2) = (api.get("a").await.unwrap(), api.get("b").await.unwrap());
    assert_eq!(
        (a2.resource_version(), a2.uid(), a2.labels().get("k").cloned()),
        (a.resource_version(), a.uid(), Some("v".into()))
    );
    assert_eq!(b2.resource_version(), b.resource_version());
    let c = api.create(&PostParams::default(), &config_map("c", &[])).await.unwrap();
    let rv = |c: &ConfigMap| c.resource_version().unwrap().parse::<u64>().unwrap();
    assert!(rv(&c) > rv(&b), "new writes continue the counter");
    assert_ne!(c.uid(), a.uid());
}

#[tokio::test]
async fn a_corrupt_state_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    std::fs::write(&path, "{not json").unwrap();
    let (server, _api) = serve().await;
    let err = Saver::start(server.store.clone(), path.clone()).err().unwrap().to_string();
    assert!(err.contains(&path.display().to_string()) && err.contains("corrupt"), "{err}");
}
