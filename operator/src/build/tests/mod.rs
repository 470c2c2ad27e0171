//! Builder tests from the YAML fixtures in `operator/tests/fixtures/`: the children as a whole
//! here, the pod template in `pod`.

use std::collections::BTreeMap;

use inferpool_crds::Tuning;
use inferpool_crds::pool::InferencePool;
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, PodTemplateSpec, Probe};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::*;

mod pod;

const FIXTURES: [(&str, &str); 4] = [
    ("cpu", include_str!("../../../tests/fixtures/cpu.yaml")),
    ("gpu", include_str!("../../../tests/fixtures/gpu.yaml")),
    ("redis", include_str!("../../../tests/fixtures/redis.yaml")),
    ("template", include_str!("../../../tests/fixtures/template.yaml")),
];

fn pool(name: &str) -> InferencePool {
    let (_, yaml) = FIXTURES.iter().find(|(n, _)| *n == name).expect("fixture exists");
    serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn settings() -> Settings {
    Settings { default_image: "ghcr.io/inferpool/sidecar:0.1.0".to_owned(), gpu_image: None, image_pull_policy: None }
}

fn build(pool: &InferencePool) -> Children {
    children(pool, &settings(), 2, &initial_tuning(&pool.spec)).expect("children")
}

fn template(children: &Children) -> &PodTemplateSpec {
    &children.deployment.spec.template
}

fn pod(children: &Children) -> &PodSpec {
    template(children).spec.as_ref().expect("pod spec")
}

fn sidecar(children: &Children) -> &Container {
    let container = &pod(children).containers[0];
    assert_eq!(container.name, "sidecar");
    container
}

fn env(container: &Container) -> BTreeMap<&str, &EnvVar> {
    container.env.iter().flatten().map(|e| (e.name.as_str(), e)).collect()
}

fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    env(container).get(name).and_then(|e| e.value.as_deref())
}

fn quantities(map: Option<&BTreeMap<String, Quantity>>) -> BTreeMap<&str, &str> {
    map.into_iter().flatten().map(|(k, v)| (k.as_str(), v.0.as_str())).collect()
}

/// A change made to a fixture.
type Edit = fn(&mut InferencePool);

fn pod_annotations(children: &Children) -> &BTreeMap<String, String> {
    template(children).metadata.as_ref().and_then(|m| m.annotations.as_ref()).expect("annotations")
}

#[test]
fn every_child_is_owned_by_the_pool_and_labelled() {
    let pool = pool("cpu");
    let children = build(&pool);
    let secret = admin_secret(&pool, "s3cret").expect("secret");
    let objects = [
        ("apps/v1", "Deployment", "faces", serde_json::to_value(&children.deployment)),
        ("v1", "Service", "faces", serde_json::to_value(&children.service)),
        ("v1", "ConfigMap", "faces-tuning", serde_json::to_value(&children.tuning)),
        ("policy/v1", "PodDisruptionBudget", "faces", serde_json::to_value(&children.pdb)),
        ("v1", "Secret", "faces-admin", serde_json::to_value(&secret)),
    ];
    for (api_version, kind, name, object) in objects {
        let object = object.expect("json");
        assert_eq!((object["apiVersion"].as_str(), object["kind"].as_str()), (Some(api_version), Some(kind)));
        let meta = &object["metadata"];
        assert_eq!(meta["name"], name, "{kind}");
        assert_eq!(meta["namespace"], "vision", "{kind}");
        assert_eq!(
            meta["ownerReferences"],
            json!([{
                "apiVersion": "inferpool.dev/v1alpha1",
                "kind": "InferencePool",
                "name": "faces",
                "uid": "0b7e4c1e-5d1a-4f0e-9a59-3f1f7f9a0001",
                "controller": true,
                "blockOwnerDeletion": true,
            }]),
            "{kind}"
        );
        assert_eq!(
            meta["labels"],
            json!({
                "app.kubernetes.io/component": "model-replica",
                "app.kubernetes.io/instance": "faces",
                "app.kubernetes.io/managed-by": "inferpool-operator",
                "app.kubernetes.io/name": "inferpool",
            }),
            "{kind}"
        );
    }
}

#[test]
fn missing_metadata_is_reported_not_guessed() {
    for (field, clear) in [
        ("namespace", (|p: &mut InferencePool| p.metadata.namespace = None) as Edit),
        ("uid", |p| p.metadata.uid = None),
        ("name", |p| p.metadata.name = None),
    ] {
        let mut pool = pool("cpu");
        clear(&mut pool);
        let error = children(&pool, &settings(), 1, &initial_tuning(&pool.spec)).expect_err(field);
        assert!(matches!(error, Error::MissingMetadata(f) if f == field), "{field}: {error}");
        assert!(matches!(admin_secret(&pool, "t"), Err(Error::MissingMetadata(f)) if f == field));
        assert!(matches!(endpoint(&pool), Err(Error::MissingMetadata(f)) if f == field));
    }
}

#[test]
fn service_and_pdb_select_the_replicas() {
    let children = build(&pool("cpu"));
    let service = serde_json::to_value(&children.service).expect("json");
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert_eq!(service["spec"]["selector"], json!(selector_labels("faces")));
    let ports: Vec<_> = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| (p["name"].clone(), p["port"].clone(), p["targetPort"].clone()))
        .collect();
    assert_eq!(ports, [(json!("http"), json!(8080), json!("http")), (json!("admin"), json!(9090), json!("admin"))]);

    let pdb = serde_json::to_value(&children.pdb).expect("json");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], json!(selector_labels("faces")));
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
}

#[test]
fn tuning_goes_to_the_config_map_and_never_restarts_pods() {
    let pool = pool("cpu");
    let first = children(&pool, &settings(), 2, &initial_tuning(&pool.spec)).expect("children");
    let data = first.tuning.data.as_ref().expect("data");
    assert_eq!(
        data,
        &BTreeMap::from([
            ("INFERPOOL_MAX_BATCH".to_owned(), "16".to_owned()),
            ("INFERPOOL_MAX_DELAY_MS".to_owned(), "5".to_owned()),
            ("INFERPOOL_MEMORY_ENTRIES".to_owned(), "1000".to_owned()),
        ])
    );
    assert_eq!(first.tuning.metadata.annotations.as_ref().expect("annotations")[TUNING_GENERATION_ANNOTATION], "1");

    let retuned = Tuning { generation: 7, max_batch_size: 64, max_delay_ms: 12, cache_entries: Some(20_000) };
    let second = children(&pool, &settings(), 5, &retuned).expect("children");
    assert_eq!(template(&second), template(&first), "a tuning change must not roll the pods");
    let data = second.tuning.data.as_ref().expect("data");
    assert_eq!((data["INFERPOOL_MAX_BATCH"].as_str(), data["INFERPOOL_MAX_DELAY_MS"].as_str()), ("64", "12"));
    assert_eq!(data["INFERPOOL_MEMORY_ENTRIES"], "20000");
    assert_eq!(second.tuning.metadata.annotations.as_ref().expect("annotations")[TUNING_GENERATION_ANNOTATION], "7");
    assert_eq!(second.deployment.spec.replicas, Some(5));

    // A tuning that leaves the cache alone falls back to the spec's capacity.
    let no_cache = Tuning { cache_entries: None, ..retuned };
    let third = children(&pool, &settings(), 5, &no_cache).expect("children");
    assert_eq!(third.tuning.data.as_ref().expect("data")["INFERPOOL_MEMORY_ENTRIES"], "1000");
}

#[test]
fn admin_secret_holds_the_token() {
    let secret = admin_secret(&pool("cpu"), "s3cret").expect("secret");
    let value = serde_json::to_value(&secret).expect("json");
    assert_eq!(value["type"], "Opaque");
    assert_eq!(value["data"], json!({"token": "czNjcmV0"}));
}

#[test]
fn selector_endpoint_and_names() {
    assert_eq!(
        selector_string("faces"),
        "app.kubernetes.io/component=model-replica,app.kubernetes.io/instance=faces,app.kubernetes.io/name=inferpool"
    );
    assert_eq!(endpoint(&pool("redis")).expect("endpoint"), "http://catalog.shop.svc:8080");
    assert_eq!(
        [names::deployment("p"), names::service("p"), names::tuning_config_map("p"), names::admin_secret("p")],
        ["p", "p", "p-tuning", "p-admin"]
    );
    assert_eq!(names::pdb("p"), "p");
}

#[test]
fn initial_tuning_starts_from_the_spec() {
    let pool = pool("redis");
    let tuning = initial_tuning(&pool.spec);
    assert_eq!(tuning, Tuning { generation: 1, max_batch_size: 16, max_delay_ms: 5, cache_entries: Some(50_000) });
    assert_eq!(tuning.validate(), Ok(()));
}

#[test]
fn apply_bodies_carry_no_status() {
    // The status belongs to the controllers that own these objects; an apply body must not touch it.
    for (name, _) in FIXTURES {
        let children = build(&pool(name));
        let bodies = [
            serde_json::to_value(&children.deployment),
            serde_json::to_value(&children.service),
            serde_json::to_value(&children.pdb),
        ];
        for body in bodies {
            let body: Value = body.expect("json");
            assert!(body.get("status").is_none(), "{name}: {}", body["kind"]);
        }
    }
}
