//! Tests of the replica pod template: env, resources, security, probes, volumes, template merge.

use super::*;

#[test]
fn cpu_pool_runs_the_sidecar_with_every_setting_from_the_spec() {
    let children = build(&pool("cpu"));
    let sidecar = sidecar(&children);
    assert_eq!(sidecar.image.as_deref(), Some("ghcr.io/inferpool/sidecar:0.1.0"));
    let want = [
        ("INFERPOOL_LISTEN", "0.0.0.0:8080"),
        ("INFERPOOL_ADMIN_LISTEN", "0.0.0.0:9090"),
        ("INFERPOOL_OPTIMIZATION", "Balanced"),
        ("INFERPOOL_PROVIDER", "cpu"),
        ("INFERPOOL_CACHE_DIR", "/var/cache/inferpool"),
        ("INFERPOOL_DATA_DIR", "/var/lib/inferpool/data"),
        ("INFERPOOL_DISK_MB", "1024"),
        ("INFERPOOL_MEMORY_LIMIT_MB", "2048"),
        ("INFERPOOL_LOG_FORMAT", "json"),
        ("INFERPOOL_DRAIN_DELAY_SECONDS", "5"),
        ("INFERPOOL_SHUTDOWN_GRACE_SECONDS", "20"),
    ];
    for (name, value) in want {
        assert_eq!(env_value(sidecar, name), Some(value), "{name}");
    }
    let env = env(sidecar);
    // The built-in model needs no path; live tuning and Redis are not in the template.
    for absent in ["INFERPOOL_MODEL", "INFERPOOL_MAX_BATCH", "INFERPOOL_REDIS_URL", "INFERPOOL_REDIS_PASSWORD"] {
        assert!(!env.contains_key(absent), "{absent} must not be set");
    }
    let token = env["INFERPOOL_ADMIN_TOKEN"].value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref());
    assert_eq!(token.map(|s| (s.name.as_str(), s.key.as_str())), Some(("faces-admin", "token")));
    assert_eq!(env["INFERPOOL_ADMIN_TOKEN"].value, None);

    let env_from = sidecar.env_from.as_ref().expect("envFrom");
    assert_eq!(env_from[0].config_map_ref.as_ref().map(|c| c.name.as_str()), Some("faces-tuning"));

    let ports: Vec<_> =
        sidecar.ports.iter().flatten().map(|p| (p.name.as_deref().unwrap_or(""), p.container_port)).collect();
    assert_eq!(ports, [("http", 8080), ("admin", 9090)]);

    let resources = sidecar.resources.as_ref().expect("resources");
    assert_eq!(quantities(resources.requests.as_ref()), BTreeMap::from([("cpu", "1"), ("memory", "2048Mi")]));
    assert_eq!(quantities(resources.limits.as_ref()), BTreeMap::from([("memory", "2048Mi")]));

    let pod = pod(&children);
    assert_eq!(pod.node_selector, None);
    assert_eq!(pod.tolerations, None);
    // The grace covers the whole shutdown the env asks for: drain delay + drain + a margin to exit.
    let seconds = |name| env_value(sidecar, name).and_then(|v| v.parse::<i64>().ok()).expect(name);
    let shutdown = seconds("INFERPOOL_DRAIN_DELAY_SECONDS") + seconds("INFERPOOL_SHUTDOWN_GRACE_SECONDS");
    assert_eq!(pod.termination_grace_period_seconds, Some(shutdown + 5));
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.enable_service_links, Some(false));
    let volumes = serde_json::to_value(&pod.volumes).expect("json");
    assert_eq!(
        volumes,
        json!([
            {"name": "cache", "emptyDir": {"sizeLimit": "1024Mi"}},
            {"name": "data", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        ])
    );
    let mounts: Vec<_> =
        sidecar.volume_mounts.iter().flatten().map(|m| (m.name.as_str(), m.mount_path.as_str())).collect();
    assert_eq!(mounts, [("cache", "/var/cache/inferpool"), ("data", "/var/lib/inferpool"), ("tmp", "/tmp")]);
}

#[test]
fn gpu_pool_asks_for_gpus_and_lands_on_gpu_nodes() {
    let children = build(&pool("gpu"));
    let sidecar = sidecar(&children);
    assert_eq!(sidecar.image.as_deref(), Some("registry.example/inferpool/sidecar:1.2.0-cuda"));
    assert_eq!(env_value(sidecar, "INFERPOOL_PROVIDER"), Some("cuda"));
    assert_eq!(env_value(sidecar, "INFERPOOL_OPTIMIZATION"), Some("Speed"));

    // The user's resources are kept as given; only the GPUs are added, equal on both sides.
    let resources = sidecar.resources.as_ref().expect("resources");
    assert_eq!(quantities(resources.limits.as_ref()), BTreeMap::from([("memory", "16Gi"), ("nvidia.com/gpu", "2")]));
    assert_eq!(quantities(resources.requests.as_ref()), BTreeMap::from([("cpu", "4"), ("nvidia.com/gpu", "2")]));

    let pod = pod(&children);
    assert_eq!(
        pod.node_selector.as_ref().and_then(|s| s.get("nvidia.com/gpu.product")).map(String::as_str),
        Some("NVIDIA-H100-80GB-HBM3")
    );
    let tolerations = serde_json::to_value(&pod.tolerations).expect("json");
    assert_eq!(tolerations, json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]));
    let cache = serde_json::to_value(&pod.volumes.as_ref().expect("volumes")[0]).expect("json");
    assert_eq!(cache, json!({"name": "cache", "emptyDir": {"sizeLimit": "8192Mi"}}));
}

#[test]
fn gpu_count_from_spec_fills_resources_derived_from_the_sla() {
    let mut pool = pool("cpu");
    pool.spec.gpu.count = 1;
    pool.spec.gpu.resource_name = "amd.com/gpu".to_owned();
    let children = build(&pool);
    let resources = sidecar(&children).resources.clone().expect("resources");
    assert_eq!(quantities(resources.limits.as_ref()), BTreeMap::from([("amd.com/gpu", "1"), ("memory", "2048Mi")]));
    assert_eq!(
        quantities(resources.requests.as_ref()),
        BTreeMap::from([("amd.com/gpu", "1"), ("cpu", "1"), ("memory", "2048Mi")])
    );
}

#[test]
fn user_gpu_quantity_wins_and_requests_match_it() {
    let mut pool = pool("gpu");
    let resources = pool.spec.resources.as_mut().expect("fixture has resources");
    resources.limits.get_or_insert_default().insert("nvidia.com/gpu".to_owned(), Quantity("4".to_owned()));
    let children = build(&pool);
    let resources = sidecar(&children).resources.clone().expect("resources");
    assert_eq!(quantities(resources.limits.as_ref())["nvidia.com/gpu"], "4");
    assert_eq!(quantities(resources.requests.as_ref())["nvidia.com/gpu"], "4");
}

#[test]
fn redis_credentials_come_from_their_secret_never_in_plain_env() {
    let children = build(&pool("redis"));
    let sidecar = sidecar(&children);
    assert_eq!(env_value(sidecar, "INFERPOOL_REDIS_URL"), Some("rediss://redis.shop.svc:6380/2"));
    assert_eq!(env_value(sidecar, "INFERPOOL_REDIS_TTL_SECONDS"), Some("86400"));
    for (var, key) in [("INFERPOOL_REDIS_USERNAME", "username"), ("INFERPOOL_REDIS_PASSWORD", "password")] {
        let credential = env(sidecar)[var];
        assert_eq!(credential.value, None, "{var}");
        let selector = credential.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).expect("secretKeyRef");
        assert_eq!((selector.name.as_str(), selector.key.as_str()), ("redis-auth", key));
    }
    // Nothing else in the pod template mentions the Secret's value or name outside the selectors.
    let text = serde_json::to_string(template(&children)).expect("json");
    assert_eq!(text.matches("redis-auth").count(), 2);

    let cache = serde_json::to_value(&pod(&children).volumes.as_ref().expect("volumes")[0]).expect("json");
    assert_eq!(cache, json!({"name": "cache", "persistentVolumeClaim": {"claimName": "catalog-cache"}}));
    assert_eq!(children.tuning.data.as_ref().expect("data")["INFERPOOL_MEMORY_ENTRIES"], "50000");
}

#[test]
fn every_pool_gets_its_own_redis_keys_and_shares_embeddings_only_when_it_opts_in() {
    let mut pool = pool("redis");
    let prefixes = |pool: &InferencePool| {
        let children = build(pool);
        let sidecar = sidecar(&children);
        let get = |var| env_value(sidecar, var).map(str::to_owned);
        (get("INFERPOOL_REDIS_PREFIX"), get("INFERPOOL_REDIS_EMBEDDING_PREFIX"))
    };
    let own = Some("inferpool:shop:catalog:".to_owned());
    assert_eq!(prefixes(&pool), (own.clone(), own.clone()));
    pool.spec.cache.redis.as_mut().expect("fixture has redis").share_embeddings = true;
    assert_eq!(prefixes(&pool), (own, Some("inferpool:shared:".to_owned())));
    // Another namespace, same name: other keys.
    pool.metadata.namespace = Some("news".to_owned());
    assert_eq!(prefixes(&pool).0.as_deref(), Some("inferpool:news:catalog:"));
}

#[test]
fn user_template_is_merged_but_cannot_override_the_operator() {
    let children = build(&pool("template"));
    let template = template(&children);
    let meta = template.metadata.as_ref().expect("metadata");

    let labels = meta.labels.as_ref().expect("labels");
    assert_eq!(labels["cost-center"], "cc-42");
    for (key, value) in selector_labels("badges") {
        assert_eq!(labels[&key], value, "selector label {key} must not be overridden");
    }
    assert_eq!(labels[MANAGED_BY_LABEL], "inferpool-operator");
    assert_eq!(children.deployment.spec.selector.match_labels, Some(selector_labels("badges")));

    let annotations = meta.annotations.as_ref().expect("annotations");
    assert_eq!(annotations["team"], "access-control");
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_ne!(annotations[RESTART_HASH_ANNOTATION], "user-value");

    let pod = pod(&children);
    let names: Vec<_> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["sidecar", "log-shipper"]);
    let shipper = serde_json::to_value(&pod.containers[1].security_context).expect("json");
    assert_eq!(
        shipper,
        json!({
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": false,
            "runAsNonRoot": true,
            "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]},
        }),
        "unset fields are filled, escalation is forced off, the user's explicit choices stay"
    );

    let volumes: Vec<_> = pod.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert_eq!(volumes, ["cache", "data", "tmp", "models"]);
    let models = pod.volumes.as_ref().expect("volumes")[3].persistent_volume_claim.as_ref().expect("pvc");
    assert_eq!((models.claim_name.as_str(), models.read_only), ("badge-models", Some(true)));

    let sidecar = &pod.containers[0];
    let mounts: Vec<_> =
        sidecar.volume_mounts.iter().flatten().map(|m| (m.name.as_str(), m.mount_path.as_str())).collect();
    assert_eq!(mounts.last(), Some(&("models", "/models")));
    assert_eq!(env_value(sidecar, "INFERPOOL_MODEL"), Some("/models/badges/card.json"));
    assert_eq!(pod.service_account_name.as_deref(), Some("badges-runner"));
    assert_eq!(pod.automount_service_account_token, None, "the user's service account keeps its token");
    assert_eq!(pod.priority_class_name.as_deref(), Some("inference-high"));
}

#[test]
fn every_container_of_every_fixture_runs_restricted() {
    for (name, _) in FIXTURES {
        let children = build(&pool(name));
        let pod = pod(&children);
        let context = serde_json::to_value(&pod.security_context).expect("json");
        assert_eq!(
            context,
            json!({
                "runAsNonRoot": true,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "fsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            }),
            "{name}"
        );
        for container in &pod.containers {
            let context = container.security_context.as_ref().expect("securityContext");
            let at = format!("{name}/{}", container.name);
            assert_eq!(context.allow_privilege_escalation, Some(false), "{at}");
            assert_eq!(context.privileged, Some(false), "{at}");
            assert_eq!(context.run_as_non_root, Some(true), "{at}");
            let drop = context.capabilities.as_ref().and_then(|c| c.drop.as_ref()).expect("drop");
            assert!(drop.contains(&"ALL".to_owned()), "{at}");
            if container.name == "sidecar" {
                assert_eq!(context.read_only_root_filesystem, Some(true), "{at}");
            }
        }
    }
}

#[test]
fn probes_give_slow_model_loads_ten_minutes() {
    let children = build(&pool("cpu"));
    let sidecar = sidecar(&children);
    let summary = |probe: &Option<Probe>| {
        let probe = probe.as_ref().expect("probe");
        let get = probe.http_get.as_ref().expect("httpGet");
        (get.path.clone().unwrap_or_default(), get.port.clone(), probe.period_seconds, probe.failure_threshold)
    };
    let http = IntOrString::String("http".to_owned());
    assert_eq!(summary(&sidecar.startup_probe), ("/readyz".to_owned(), http.clone(), Some(5), Some(120)));
    assert_eq!(summary(&sidecar.readiness_probe), ("/readyz".to_owned(), http.clone(), Some(5), Some(2)));
    assert_eq!(summary(&sidecar.liveness_probe), ("/healthz".to_owned(), http, Some(10), Some(3)));
}

#[test]
fn deployment_rolls_out_without_losing_capacity() {
    let children = build(&pool("cpu"));
    let deployment = serde_json::to_value(&children.deployment).expect("json");
    assert_eq!(deployment["apiVersion"], "apps/v1");
    assert_eq!(deployment["kind"], "Deployment");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["revisionHistoryLimit"], 3);
    assert_eq!(
        spec["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}})
    );
    let selector = json!({
        "app.kubernetes.io/component": "model-replica",
        "app.kubernetes.io/instance": "faces",
        "app.kubernetes.io/name": "inferpool",
    });
    assert_eq!(spec["selector"]["matchLabels"], selector);
    assert_eq!(
        spec["template"]["spec"]["topologySpreadConstraints"],
        json!([{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector},
        }])
    );
    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9090");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
}

#[test]
fn restart_hash_changes_exactly_with_the_settings_that_need_a_restart() {
    let base = pool("cpu");
    let hash = |pool: &InferencePool, settings: &Settings| {
        let children = children(pool, settings, 1, &initial_tuning(&pool.spec)).expect("children");
        pod_annotations(&children)[RESTART_HASH_ANNOTATION].clone()
    };
    let original = hash(&base, &settings());
    assert_eq!(original.len(), 16);
    assert!(original.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(original, restart_hash(&base.spec, &settings()));

    let changes: [(&str, Edit); 4] = [
        ("model", |p| p.spec.model.uri = "file:///models/v2/card.json".to_owned()),
        ("optimization", |p| p.spec.optimization = inferpool_crds::pool::Optimization::Memory),
        ("gpu", |p| p.spec.gpu.count = 1),
        ("image", |p| p.spec.image = Some("registry.example/sidecar:2".to_owned())),
    ];
    for (what, change) in changes {
        let mut changed = base.clone();
        change(&mut changed);
        assert_ne!(hash(&changed, &settings()), original, "{what}");
    }
    let new_default = Settings { default_image: "ghcr.io/inferpool/sidecar:0.2.0".to_owned(), ..settings() };
    assert_ne!(hash(&base, &new_default), original, "the operator's default image");

    let mut batching = base.clone();
    batching.spec.batching.max_batch_size = 64;
    assert_eq!(hash(&batching, &settings()), original, "batching is live-tuned");
}

#[test]
fn image_pull_policy_comes_from_the_settings() {
    let settings = Settings { image_pull_policy: Some("IfNotPresent".to_owned()), ..settings() };
    let pool = pool("cpu");
    let children = children(&pool, &settings, 1, &initial_tuning(&pool.spec)).expect("children");
    assert_eq!(sidecar(&children).image_pull_policy.as_deref(), Some("IfNotPresent"));
}

#[test]
fn gpu_pools_get_the_cuda_image_unless_they_name_their_own() {
    let settings = Settings { gpu_image: Some("ghcr.io/inferpool/sidecar-cuda:0.1.0".to_owned()), ..settings() };
    let image = |pool: &InferencePool| {
        let children = children(pool, &settings, 1, &initial_tuning(&pool.spec)).expect("children");
        sidecar(&children).image.clone().expect("image")
    };
    let mut gpu = pool("gpu");
    assert_eq!(image(&gpu), "registry.example/inferpool/sidecar:1.2.0-cuda", "its own image wins");
    gpu.spec.image = None;
    assert_eq!(image(&gpu), "ghcr.io/inferpool/sidecar-cuda:0.1.0");
    assert_eq!(image(&pool("cpu")), settings.default_image, "CPU pools keep the default image");
}

#[test]
fn an_unreadable_template_volume_is_an_invalid_spec() {
    let mut pool = pool("template");
    pool.spec.template.as_mut().expect("template").volumes = vec![json!({"name": "v", "emptyDir": 3})];
    let error = build_error(&pool);
    assert!(matches!(&error, Error::InvalidSpec(errors) if errors[0].field == "template.volumes"), "{error}");
    assert!(error.is_permanent());
}

fn build_error(pool: &InferencePool) -> Error {
    children(pool, &settings(), 1, &initial_tuning(&pool.spec)).expect_err("must fail")
}
