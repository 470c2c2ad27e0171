"""The chart renders, lints clean and produces valid Kubernetes objects for the default values and
every ci/*.yaml; its RBAC is exactly what the operator uses; the CRD copy matches the generated one."""

from __future__ import annotations

import json

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from chart_support import (
    CASE_IDS,
    CHART,
    DASHBOARD,
    GENERATED_CRD,
    NAMESPACE,
    POOL_FILES,
    RELEASE,
    ROOT,
    chart_crds,
    find,
    notes,
    one,
    operator_render,
    render,
    values_of,
)

# Kubernetes versions the objects are validated against: the oldest the chart supports (its
# kubeVersion) and the newest the schema package ships.
KUBE_VERSIONS = ["1.31.0", "1.37.0"]
# prometheus-operator kinds: no schema in kubernetes-validate, so their shape is checked here.
MONITORING_SPEC_KEYS = {
    "PodMonitor": {"selector", "namespaceSelector", "podMetricsEndpoints"},
    "ServiceMonitor": {"selector", "namespaceSelector", "endpoints"},
    "PrometheusRule": {"groups"},
}


@pytest.mark.parametrize("case", CASE_IDS)
def test_lint_is_clean(case):
    report = helm.lint(CHART, values_of(case), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error; 1 is info
    assert not problems and not report["errors"], json.dumps(report, indent=2)


@pytest.mark.parametrize("case", CASE_IDS)
def test_every_object_is_named_once(case):
    objects = render(values_of(case))
    keys = [(o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), keys
    for o in objects:
        assert o["metadata"]["labels"]["app.kubernetes.io/name"] == "inferpool", o["metadata"]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_objects_match_the_kubernetes_schemas(case, version):
    for o in render(values_of(case)):
        if o["apiVersion"] == "monitoring.coreos.com/v1":
            assert MONITORING_SPEC_KEYS[o["kind"]] <= set(o["spec"]), o
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{o['kind']} {o['metadata']['name']} (Kubernetes {version}): {error.message} at {list(error.path)}")


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_crd_matches_the_apiextensions_schema(version):
    (crd,) = chart_crds()
    kubernetes_validate.validate(yaml.safe_load(crd["data"]), version, strict=True)


def test_crd_copy_is_the_generated_file():
    (crd,) = chart_crds()
    assert crd["data"] == GENERATED_CRD.read_text(), (
        "charts/inferpool/crds/inferencepool.yaml differs from crds/inferencepool.yaml: "
        "cp crds/inferencepool.yaml charts/inferpool/crds/"
    )


# Values that values.schema.json must refuse: (what, values).
BAD_VALUES = [
    ("unknown top-level key", {"replicas": 3}),
    ("unknown nested key", {"networkPolicy": {"enable": True}}),
    ("replicaCount as text", {"replicaCount": "two"}),
    ("replicaCount zero", {"replicaCount": 0}),
    ("toggle as text", {"networkPolicy": {"enabled": "yes"}}),
    ("bad pull policy", {"image": {"pullPolicy": "Sometimes"}}),
    ("bad log format", {"operator": {"logFormat": "xml"}}),
    ("lease too short", {"leaderElection": {"leaseDurationSeconds": 1}}),
    ("namespace not a DNS label", {"watchNamespace": "Vision_NS"}),
    ("privileged metrics port", {"metrics": {"port": 80}}),
    ("bad scrape interval", {"monitoring": {"podMonitor": {"interval": "often"}}}),
    ("label value not a string", {"podLabels": {"team": 7}}),
]


@pytest.mark.parametrize("values", [v for _, v in BAD_VALUES], ids=[w for w, _ in BAD_VALUES])
def test_schema_rejects(values):
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_two_replicas_need_leader_election():
    with pytest.raises(helm.HelmRenderError, match="leaderElection"):
        render({"replicaCount": 2, "leaderElection": {"enabled": False}})


# The operator's permissions are checked against what it does, not against a list kept here:
# tests/tests/operator/rbac.rs enforces the ClusterRole and the leader-election Role rendered by
# charts/tests/operator_rbac.py on the operator in every end-to-end test (a missing verb is a 403
# there) and fails on any granted verb the operator never used. Here: the shapes around them.


def rules_of(role: dict) -> dict:
    granted: dict = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def binds_operator(binding: dict, role: dict) -> bool:
    return binding["roleRef"]["kind"] == role["kind"] and binding["roleRef"]["name"] == role["metadata"]["name"] and {
        "kind": "ServiceAccount",
        "name": "inferpool",
        "namespace": NAMESPACE,
    } in binding["subjects"]


@pytest.mark.parametrize(
    "case, kind, namespace",
    [("default", "ClusterRole", None), ("namespace-scoped-values", "Role", "vision")],
)
def test_rbac_is_least_privilege(case, kind, namespace):
    objects = render(values_of(case))
    role = one(objects, kind, "inferpool")
    assert role["metadata"].get("namespace") == namespace
    # A namespace-scoped install grants the same verbs, only in one namespace.
    assert rules_of(role) == rules_of(one(render({}), "ClusterRole", "inferpool"))
    assert not any("get" in verbs or "list" in verbs or "watch" in verbs for (group, resource), verbs in rules_of(role).items() if resource == "secrets"), "the operator must not read Secrets"
    assert binds_operator(one(objects, kind + "Binding", "inferpool"), role)
    leader = one(objects, "Role", "inferpool-leader-election")
    assert leader["metadata"]["namespace"] == NAMESPACE
    assert {resource for (_, resource) in rules_of(leader)} == {"leases"}
    assert binds_operator(one(objects, "RoleBinding", "inferpool-leader-election"), leader)
    # The only other ClusterRoles are the user-facing aggregated ones, which the operator never holds.
    others = [r for r in find(objects, "ClusterRole") if r is not role]
    assert {r["metadata"]["name"] for r in others} == {"inferpool-view", "inferpool-edit"}
    assert not [b for b in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding") if b["roleRef"]["name"] in {"inferpool-view", "inferpool-edit"}]


def operator_container(objects: list[dict]) -> dict:
    (container,) = one(objects, "Deployment", "inferpool")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize(
    "case, want, unwanted",
    [
        ("default", ["--leader-election=true", "--default-image=ghcr.io/inferpool/sidecar:0.1.0"], ["--namespace"]),
        ("namespace-scoped-values", ["--namespace=vision", "--image-pull-policy=IfNotPresent"], []),
        ("no-network-policy-values", ["--leader-election=false", "--log-format=text"], ["--lease-name"]),
    ],
)
def test_operator_flags(case, want, unwanted):
    args = operator_container(render(values_of(case)))["args"]
    assert args[0] == "run"
    for flag in want:
        assert flag in args, args
    for prefix in unwanted:
        assert not any(a.startswith(prefix) for a in args), args


def test_operator_pod_identity_comes_from_the_downward_api():
    env = {e["name"]: e for e in operator_container(render({}))["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_operator_probes_and_replicas():
    objects = render({})
    deployment = one(objects, "Deployment", "inferpool")
    assert deployment["spec"]["replicas"] == 2
    container = operator_container(objects)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    pdb = one(objects, "PodDisruptionBudget", "inferpool")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_metrics_service_and_service_monitor_reach_the_operator():
    objects = render(values_of("monitoring-values"))
    pod_labels = one(objects, "Deployment", "inferpool")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service", "inferpool-metrics")
    assert selects(service["spec"]["selector"], pod_labels)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    monitor = one(objects, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["honorLabels"], "the pool series' namespace label must survive"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("case", CASE_IDS)
def test_monitoring_objects_follow_their_toggles(case):
    values = values_of(case)
    kinds = {o["kind"] for o in render(values)}
    monitoring = values.get("monitoring", {})
    for kind, key in [("PodMonitor", "podMonitor"), ("ServiceMonitor", "serviceMonitor"), ("PrometheusRule", "prometheusRule")]:
        assert (kind in kinds) == monitoring.get(key, {}).get("enabled", False), kind
    assert ("NetworkPolicy" in kinds) == values.get("networkPolicy", {}).get("enabled", True)


def test_network_policy_admits_only_the_operator_on_the_admin_port():
    objects = render({})
    operator_labels = one(objects, "Deployment", "inferpool")["spec"]["template"]["metadata"]["labels"]
    policy = one(objects, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    by_port = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    assert set(by_port) == {8080, 9090}
    assert "from" not in by_port[8080], "the API port serves every client"
    (peer,) = by_port[9090]["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": NAMESPACE}
    assert selects(peer["podSelector"]["matchLabels"], operator_labels)


@pytest.mark.parametrize("pool_file", POOL_FILES, ids=[p.stem for p in POOL_FILES])
def test_network_policy_and_pod_monitor_select_the_pods_the_operator_builds(pool_file):
    deployment = one(operator_render(pool_file), "Deployment")
    pod = deployment["spec"]["template"]
    objects = render(values_of("monitoring-values"))
    for policy in find(objects, "NetworkPolicy"):
        assert selects(policy["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])
    monitor = one(objects, "PodMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ports[monitor["spec"]["podMetricsEndpoints"][0]["port"]] == 9090


def test_network_policy_per_namespace_with_metrics_peers():
    objects = render(values_of("monitoring-values"))
    policies = find(objects, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["default", "vision"]
    for policy in policies:
        admin = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 9090)
        assert len(admin["from"]) == 2, "the operator and Prometheus"


def test_dashboard_config_map_carries_the_dashboard():
    if not DASHBOARD.exists():
        pytest.fail(f"{DASHBOARD.relative_to(CHART)} is missing from the chart")
    config_map = one(render(values_of("monitoring-values")), "ConfigMap", "inferpool-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert json.loads(config_map["data"]["inferpool.json"]) == json.loads(DASHBOARD.read_text())


@pytest.mark.parametrize("case", CASE_IDS)
def test_notes_render(case):
    text = notes(values_of(case))
    assert f"release {RELEASE}" in text and "kubectl apply --server-side --force-conflicts -f crds/inferencepool.yaml" in text


def test_gpu_example_gets_the_charts_cuda_image_and_is_refused_without_one():
    pool_file = ROOT / "examples" / "gpu-pool.yaml"
    deployment = one(operator_render(pool_file), "Deployment")
    sidecar = deployment["spec"]["template"]["spec"]["containers"][0]
    assert sidecar["image"] == "ghcr.io/inferpool/sidecar-cuda:0.1.0"
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["INFERPOOL_PROVIDER"] == "cuda"
    # CPU pools keep the default image.
    cpu = one(operator_render(ROOT / "examples" / "cpu-pool.yaml"), "Deployment")
    assert cpu["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/inferpool/sidecar:0.1.0"
    # Without a CUDA image the pool is refused with the reason, not run on the CPU image.
    out = operator_render(pool_file, {"sidecar": {"gpuImage": {"repository": ""}}}, check=False)
    assert out.returncode != 0
    assert "no CUDA sidecar image" in out.stderr and "sidecar.gpuImage" in out.stderr, out.stderr


def test_the_admin_key_is_generated_once_kept_and_mounted_or_brought_by_the_user():
    objects = render({})
    secret = one(objects, "Secret", "inferpool-admin-key")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(secret["data"]["key"]) >= 32
    pod = one(objects, "Deployment", "inferpool")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "admin-key")
    assert volume["secret"]["secretName"] == "inferpool-admin-key"
    container = operator_container(objects)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "admin-key")
    assert f"--admin-key-file={mount['mountPath']}/key" in container["args"]
    assert mount["readOnly"] is True
    brought = render({"adminKey": {"existingSecret": "my-key"}})
    assert not find(brought, "Secret", "inferpool-admin-key")
    pod = one(brought, "Deployment", "inferpool")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "admin-key")["secret"]["secretName"] == "my-key"
