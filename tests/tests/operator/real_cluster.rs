//! The same flow against a real cluster (kind, k3d, or any other), ignored by default:
//!
//! ```sh
//! kubectl apply --server-side -f crds/inferencepool.yaml
//! KUBECONFIG=~/.kube/config INFERPOOL_TEST_IMAGE=<sidecar image the nodes can pull> \
//!     cargo test -p inferpool-tests --test operator real_cluster -- --ignored --test-threads 1
//! ```
//!
//! The operator runs in the test process with the kubeconfig's credentials (it needs the RBAC the
//! chart grants); pools go to `INFERPOOL_TEST_NAMESPACE` (default `default`) and are deleted at the
//! end.

use super::*;

const REAL_WAIT: Duration = Duration::from_secs(600);

async fn real() -> (Config, String, String) {
    let config = Config::infer().await.expect("KUBECONFIG or in-cluster config");
    let image =
        std::env::var("INFERPOOL_TEST_IMAGE").expect("INFERPOOL_TEST_IMAGE: a sidecar image the nodes can pull");
    let namespace = std::env::var("INFERPOOL_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    (config, image, namespace)
}

#[tokio::test]
#[ignore = "needs a real cluster: KUBECONFIG and INFERPOOL_TEST_IMAGE"]
async fn a_pool_becomes_ready_scales_and_is_deleted_on_a_real_cluster() {
    let (config, image, namespace) = real().await;
    let client = Client::try_from(config.clone()).unwrap();
    let _operator = Operator::with_config(config, &image, &namespace, "real-cluster-test", Some(15));
    let pools: Api<InferencePool> = Api::namespaced(client.clone(), &namespace);
    let mut manual = pool("inferpool-e2e", json!({"autoscaling": {"enabled": false}, "replicas": {"count": 1}}));
    manual.metadata.namespace = Some(namespace.clone());
    pools.create(&PostParams::default(), &manual).await.unwrap();

    let ready = |n: i32| {
        move |p: Option<&InferencePool>| {
            p.is_some_and(|p| {
                condition(p, "Ready").is_some_and(|c| c.0 == "True")
                    && p.status.as_ref().is_some_and(|s| s.ready_replicas == n)
            })
        }
    };
    let within = |f| async move { tokio::time::timeout(REAL_WAIT, f).await.expect("timed out") };
    within(await_condition(pools.clone(), "inferpool-e2e", ready(1))).await.unwrap();

    let scale = json!({"spec": {"replicas": 2}});
    pools.patch_scale("inferpool-e2e", &PatchParams::default(), &Patch::Merge(&scale)).await.unwrap();
    within(await_condition(pools.clone(), "inferpool-e2e", ready(2))).await.unwrap();

    let uid = pools.get("inferpool-e2e").await.unwrap().uid().unwrap();
    pools.delete("inferpool-e2e", &DeleteParams::foreground()).await.unwrap();
    let deleted = await_condition(pools.clone(), "inferpool-e2e", kube::runtime::wait::conditions::is_deleted(&uid));
    tokio::time::timeout(REAL_WAIT, deleted).await.expect("timed out").unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client, &namespace);
    assert!(deployments.get_opt("inferpool-e2e").await.unwrap().is_none());
}
