//! Server-side apply with field ownership: managers, conflicts, force, removal of fields a manager
//! stops applying, and the operator's pattern (forced apply, status by apply to /status).

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject};
use kube::{Api, Client};
use serde_json::{Value, json};

use super::{api_status, raw, start};

fn deployment(replicas: i32, labels: Value, min_ready: Option<i32>) -> Value {
    let mut d = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "d", "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}}},
    });
    if let Some(m) = min_ready {
        d["spec"]["minReadySeconds"] = json!(m);
    }
    d
}

fn managers(d: &Deployment) -> Vec<(String, String)> {
    let mut out: Vec<_> = d
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| (m.manager.clone().unwrap(), m.operation.clone().unwrap()))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn apply_tracks_field_owners() {
    let (_server, client) = start().await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let a = PatchParams::apply("alpha");
    let d = api.patch("d", &a, &Patch::Apply(deployment(1, json!({"x": "1"}), Some(5)))).await.unwrap();
    assert_eq!(managers(&d), [("alpha".to_owned(), "Apply".to_owned())]);
    let entry = &d.metadata.managed_fields.as_ref().unwrap()[0];
    assert_eq!((entry.api_version.as_deref(), entry.fields_type.as_deref()), (Some("apps/v1"), Some("FieldsV1")));
    let fields = serde_json::to_value(entry.fields_v1.as_ref().unwrap()).unwrap();
    assert_eq!(fields["f:spec"]["f:replicas"], json!({}), "{fields}");
    assert_eq!(fields["f:metadata"]["f:labels"]["f:x"], json!({}), "{fields}");

    // Another manager setting the same field to the same value shares it; to another value conflicts.
    let b = PatchParams::apply("beta");
    let same =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 1}});
    api.patch("d", &b, &Patch::Apply(&same)).await.unwrap();
    let other =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 3}});
    let s = api_status(api.patch("d", &b, &Patch::Apply(&other)).await.unwrap_err());
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    let cause = &s.details.unwrap().causes[0];
    assert_eq!(
        (cause.reason.as_str(), cause.field.as_str(), cause.message.as_str()),
        ("FieldManagerConflict", ".spec.replicas", "conflict with \"alpha\" using apps/v1")
    );
    assert_eq!(api.get("d").await.unwrap().spec.replicas, Some(1), "a refused apply changes nothing");

    // Forced, beta takes the field over.
    let d = api.patch("d", &b.clone().force(), &Patch::Apply(&other)).await.unwrap();
    assert_eq!(d.spec.replicas, Some(3));
    // alpha applies again without minReadySeconds and the label, and its old replicas: what it
    // alone owned is removed; replicas is beta's now and stays.
    let again = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}}},
    });
    let d = api.patch("d", &a, &Patch::Apply(&again)).await.unwrap();
    assert_eq!(d.spec.min_ready_seconds, None, "an omitted field is removed");
    assert!(!d.metadata.labels.unwrap_or_default().contains_key("x"));
    assert_eq!(d.spec.replicas, Some(3), "a field another manager owns stays");

    // A merge patch is an Update: it always succeeds and takes the field.
    let merged = PatchParams { field_manager: Some("kubectl-edit".into()), ..Default::default() };
    let d = api.patch("d", &merged, &Patch::Merge(json!({"spec": {"replicas": 4}}))).await.unwrap();
    assert!(managers(&d).contains(&("kubectl-edit".to_owned(), "Update".to_owned())));
    let s = api_status(api.patch("d", &b, &Patch::Apply(&other)).await.unwrap_err());
    assert!(s.message.contains("conflict with \"kubectl-edit\""), "{}", s.message);
}

#[tokio::test]
async fn apply_needs_a_field_manager() {
    let (_server, client) = start().await;
    let body = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}"#;
    let path = "/api/v1/namespaces/default/configmaps/c";
    let e = raw(&client, "PATCH", path, "application/apply-patch+yaml", body).await.unwrap_err();
    let s = api_status(e);
    assert_eq!((s.code, s.details.unwrap().causes[0].field.as_str()), (422, "fieldManager"));
}

#[tokio::test]
async fn the_operators_apply_pattern_works() {
    let (_server, client) = start().await;
    let ar = ApiResource::erase::<inferpool_crds::InferencePool>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(Client::clone(&client), "default", &ar);
    let pp = PatchParams::apply("inferpool-operator").force();
    let pool = |count: i64| {
        json!({"apiVersion": "inferpool.dev/v1alpha1", "kind": "InferencePool", "metadata": {"name": "p"},
               "spec": {"replicas": {"count": count}}})
    };
    api.patch("p", &pp, &Patch::Apply(pool(2))).await.unwrap();
    let status = json!({"apiVersion": "inferpool.dev/v1alpha1", "kind": "InferencePool",
                        "status": {"replicas": 2, "readyReplicas": 1, "selector": "a=b"}});
    let after = api.patch_status("p", &pp, &Patch::Apply(&status)).await.unwrap();
    assert_eq!(after.data["status"]["readyReplicas"], 1);
    assert_eq!(after.data["spec"]["replicas"]["count"], 2, "the reply is the whole object");
    let entries = after.metadata.managed_fields.clone().unwrap();
    assert!(entries.iter().any(|e| e.subresource.as_deref() == Some("status")));

    // The next reconcile applies the spec again, without a status: the status stays, and a
    // status apply without readyReplicas drops it.
    let again = api.patch("p", &pp, &Patch::Apply(pool(3))).await.unwrap();
    assert_eq!(
        (again.data["spec"]["replicas"]["count"].as_i64(), again.data["status"]["readyReplicas"].as_i64()),
        (Some(3), Some(1))
    );
    let fewer = json!({"apiVersion": "inferpool.dev/v1alpha1", "kind": "InferencePool", "status": {"replicas": 3, "selector": "a=b"}});
    let after = api.patch_status("p", &pp, &Patch::Apply(&fewer)).await.unwrap();
    assert_eq!(after.data["status"]["replicas"], 3);
    assert_eq!(after.data["status"]["readyReplicas"], 0, "removed, then defaulted by the schema");
}

#[tokio::test]
async fn a_repeated_apply_writes_nothing_and_a_stale_resource_version_conflicts() {
    let (_server, client) = start().await;
    let api: Api<Deployment> = Api::namespaced(client, "default");
    let pp = PatchParams::apply("op").force();
    let body = deployment(2, json!({"x": "1"}), None);
    let first = api.patch("d", &pp, &Patch::Apply(&body)).await.unwrap();
    let again = api.patch("d", &pp, &Patch::Apply(&body)).await.unwrap();
    assert_eq!(again.metadata.resource_version, first.metadata.resource_version, "a no-op apply was a write");
    assert_eq!(again.metadata.managed_fields, first.metadata.managed_fields);

    // A resourceVersion in the body is a precondition.
    let mut stale = deployment(3, json!({"x": "1"}), None);
    stale["metadata"]["resourceVersion"] = json!("1");
    let status = api_status(api.patch("d", &pp, &Patch::Apply(&stale)).await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    let mut current = deployment(3, json!({"x": "1"}), None);
    current["metadata"]["resourceVersion"] = json!(first.metadata.resource_version);
    let applied = api.patch("d", &pp, &Patch::Apply(&current)).await.unwrap();
    assert_eq!(applied.spec.replicas, Some(3));
}

#[tokio::test]
async fn omitting_a_whole_object_removes_it_not_just_its_fields() {
    let (_server, client) = start().await;
    let api: Api<Deployment> = Api::namespaced(client, "default");
    let pp = PatchParams::apply("op").force();
    let mut body = deployment(1, json!({}), None);
    body["spec"]["template"]["metadata"]["annotations"] = json!({"a": "1", "b": "2"});
    api.patch("d", &pp, &Patch::Apply(&body)).await.unwrap();
    let without = deployment(1, json!({}), None);
    let d = api.patch("d", &pp, &Patch::Apply(&without)).await.unwrap();
    let template = d.spec.template.metadata.unwrap();
    assert_eq!(template.annotations, None, "an empty annotations map was left behind");
    assert!(template.labels.is_some(), "the fields still applied stay");
}
