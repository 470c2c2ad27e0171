//! InferencePools are served from the generated CRD: pruned, defaulted and validated like a real
//! API server does it, with its scale subresource.

use inferpool_crds::InferencePool;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject};
use kube::{Api, Client};
use serde_json::{Value, json};

use super::{api_status, start};

fn pools(client: Client) -> Api<DynamicObject> {
    Api::namespaced_with(client, "default", &ApiResource::erase::<InferencePool>(&()))
}

fn pool(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "inferpool.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

#[tokio::test]
async fn inference_pools_are_defaulted_and_pruned() {
    let (_server, client) = start().await;
    let api = pools(client);
    let created = api
        .create(&PostParams::default(), &pool("p", json!({"replicas": {"max": 4}, "bogus": 1, "gpu": {"junk": true}})))
        .await
        .unwrap();
    let spec = &created.data["spec"];
    assert_eq!(spec["replicas"], json!({"count": 1, "min": 1, "max": 4}), "defaults fill what is missing");
    assert_eq!(spec["optimization"], "Balanced");
    assert_eq!(spec["model"]["uri"], "default");
    assert_eq!(spec["sla"]["p95LatencyMs"], 500);
    assert!(spec.get("bogus").is_none() && spec["gpu"].get("junk").is_none(), "unknown fields are pruned: {spec}");
    // Preserved-unknown fields stay (a volume is a whole core/v1 Volume).
    let volumes = json!({"spec": {"template": {"volumes": [{"name": "models", "emptyDir": {}}]}}});
    let patched = api.patch("p", &PatchParams::default(), &Patch::Merge(volumes)).await.unwrap();
    assert_eq!(patched.data["spec"]["template"]["volumes"][0]["emptyDir"], json!({}));
}

#[tokio::test]
async fn invalid_inference_pools_get_422_with_every_cause() {
    let (_server, client) = start().await;
    let api = pools(client.clone());
    // spec, then the (reason, field) of each cause
    let cases: Vec<(Value, Vec<(&str, &str)>)> = vec![
        (json!({"replicas": {"min": -1}}), vec![("FieldValueInvalid", "spec.replicas.min")]),
        (json!({"replicas": {"max": 1001}}), vec![("FieldValueInvalid", "spec.replicas.max")]),
        (json!({"optimization": "Fast"}), vec![("FieldValueNotSupported", "spec.optimization")]),
        (json!({"replicas": {"count": "two"}}), vec![("FieldValueTypeInvalid", "spec.replicas.count")]),
        (json!({"model": {"uri": "http://x"}}), vec![("FieldValueInvalid", "spec.model.uri")]),
        (json!({"cache": {"redis": {"ttlSeconds": 5}}}), vec![("FieldValueRequired", "spec.cache.redis.url")]),
        (json!({"gpu": {"resourceName": ""}}), vec![("FieldValueInvalid", "spec.gpu.resourceName")]),
        (
            json!({"template": {"volumes": [{"emptyDir": {}}]}}),
            vec![("FieldValueRequired", "spec.template.volumes[0].name")],
        ),
        (
            json!({"replicas": {"min": -1}, "optimization": "Fast"}),
            vec![("FieldValueInvalid", "spec.replicas.min"), ("FieldValueNotSupported", "spec.optimization")],
        ),
    ];
    for (i, (spec, want)) in cases.into_iter().enumerate() {
        let name = format!("bad{i}");
        let s = api_status(api.create(&PostParams::default(), &pool(&name, spec.clone())).await.unwrap_err());
        assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{spec}");
        let details = s.details.unwrap();
        assert_eq!(
            (details.name.as_str(), details.group.as_str(), details.kind.as_str()),
            (name.as_str(), "inferpool.dev", "InferencePool")
        );
        let mut got: Vec<_> = details.causes.iter().map(|c| (c.reason.as_str(), c.field.as_str())).collect();
        got.sort();
        assert_eq!(got, want, "{spec}: {}", s.message);
        assert!(
            s.message.starts_with(&format!("InferencePool.inferpool.dev \"{name}\" is invalid: ")),
            "{}",
            s.message
        );
    }

    // The exact wording of one, as the real API server has it.
    let s =
        api_status(api.create(&PostParams::default(), &pool("w", json!({"replicas": {"min": -1}}))).await.unwrap_err());
    assert_eq!(
        s.message,
        "InferencePool.inferpool.dev \"w\" is invalid: spec.replicas.min: Invalid value: -1: spec.replicas.min in body should be greater than or equal to 0"
    );
    assert_eq!(
        s.details.unwrap().causes[0].message,
        "Invalid value: -1: spec.replicas.min in body should be greater than or equal to 0"
    );

    // Updates are checked after the patch is applied, status writes on the whole object, and a
    // rejected write changes nothing.
    api.create(&PostParams::default(), &pool("ok", json!({}))).await.unwrap();
    let merge = Patch::Merge(json!({"spec": {"replicas": {"count": -3}}}));
    let s = api_status(api.patch("ok", &PatchParams::default(), &merge).await.unwrap_err());
    assert_eq!(s.details.unwrap().causes[0].field, "spec.replicas.count");
    let apply =
        json!({"apiVersion": "inferpool.dev/v1alpha1", "kind": "InferencePool", "spec": {"optimization": "Fast"}});
    let applied = api.patch("ok", &PatchParams::apply("t").force(), &Patch::Apply(apply)).await.unwrap_err();
    assert_eq!(api_status(applied).code, 422);
    let status = json!({"status": {"replicas": "many"}});
    let s = api_status(api.patch_status("ok", &PatchParams::default(), &Patch::Merge(status)).await.unwrap_err());
    assert_eq!(s.details.unwrap().causes[0].field, "status.replicas");
    let mut current = api.get("ok").await.unwrap();
    current.data["spec"]["gpu"]["count"] = json!(17);
    let s = api_status(api.replace("ok", &PostParams::default(), &current).await.unwrap_err());
    assert_eq!(s.details.unwrap().causes[0].field, "spec.gpu.count");
    assert_eq!(api.get("ok").await.unwrap().data["spec"]["replicas"]["count"], 1);
}

#[tokio::test]
async fn inference_pool_scale_follows_the_crd() {
    let (_server, client) = start().await;
    let api = pools(client);
    api.create(&PostParams::default(), &pool("s", json!({"replicas": {"count": 2}}))).await.unwrap();
    let status = json!({"status": {"replicas": 2, "selector": "inferpool.dev/pool=s"}});
    api.patch_status("s", &PatchParams::default(), &Patch::Merge(status)).await.unwrap();

    let scale = api.get_scale("s").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    let st = scale.status.unwrap();
    assert_eq!((st.replicas, st.selector.as_deref()), (2, Some("inferpool.dev/pool=s")));

    let scaled =
        api.patch_scale("s", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 5}}))).await.unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(5));
    let current = api.get("s").await.unwrap();
    assert_eq!((current.data["spec"]["replicas"]["count"].as_i64(), current.metadata.generation), (Some(5), Some(2)));

    let mut whole = api.get_scale("s").await.unwrap();
    whole.spec.as_mut().unwrap().replicas = Some(3);
    api.replace_scale("s", &PostParams::default(), &whole).await.unwrap();
    assert_eq!(api.get("s").await.unwrap().data["spec"]["replicas"]["count"], 3);

    // The CRD's maximum still holds through /scale.
    let too_many = Patch::Merge(json!({"spec": {"replicas": 5000}}));
    let s = api_status(api.patch_scale("s", &PatchParams::default(), &too_many).await.unwrap_err());
    assert_eq!((s.code, s.details.unwrap().causes[0].field.as_str()), (422, "spec.replicas.count"));
}
