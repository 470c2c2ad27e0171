//! Label selectors on lists and watches: equality and set-based terms, and 400 for a malformed one.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};

use super::{api_status, config_map, start};

#[tokio::test]
async fn set_based_label_selectors() {
    let (_server, client) = start().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    for (name, labels) in [
        ("web", &[("app", "web"), ("tier", "front")][..]),
        ("db", &[("app", "db")][..]),
        ("cache", &[("app", "cache"), ("tier", "back")][..]),
        ("bare", &[][..]),
    ] {
        api.create(&PostParams::default(), &config_map(name, labels)).await.unwrap();
    }
    let cases = [
        ("app in (web,db)", vec!["db", "web"]),
        ("app notin (web,db)", vec!["bare", "cache"]),
        ("tier", vec!["cache", "web"]),
        ("!tier", vec!["bare", "db"]),
        ("app in (web, cache),tier notin (back)", vec!["web"]),
        ("app,app!=db", vec!["cache", "web"]),
        ("app=db", vec!["db"]),
        ("", vec!["bare", "cache", "db", "web"]),
    ];
    for (selector, want) in cases {
        let mut got: Vec<String> = api
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap()
            .items
            .iter()
            .map(|c| c.name_any())
            .collect();
        got.sort();
        assert_eq!(got, want, "{selector}");
    }
    for bad in ["app in (web", "app notin", "app in ()", "a b"] {
        let s = api_status(api.list(&ListParams::default().labels(bad)).await.unwrap_err());
        assert_eq!((s.code, s.reason.as_str()), (400, "BadRequest"), "{bad}");
        assert!(s.message.contains("unable to parse label selector"), "{bad}: {}", s.message);
    }
}
