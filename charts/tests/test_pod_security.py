"""Pod Security Standards, "restricted" profile, as a table: every check against every pod spec the
chart renders (default values and each ci/*.yaml) and every Deployment the operator builds for the
example pools and its test fixtures (`inferpool-operator render -f POOL`).

The checks follow https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the baseline
controls plus the restricted ones) and are written out here so that each failure names the control.
"""

from __future__ import annotations

import copy

import pytest

from chart_support import CASE_IDS, POOL_FILES, operator_render, render, values_of

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec.get("containers", []) + spec.get("ephemeralContainers", [])


def sc(container: dict) -> dict:
    return container.get("securityContext") or {}


def each(spec: dict, bad) -> list[str]:
    """Names of the containers for which `bad(container)` holds."""
    return [c["name"] for c in containers(spec) if bad(c)]


def effective(spec: dict, container: dict, key: str):
    """A container's setting, else the pod's."""
    return sc(container).get(key, (spec.get("securityContext") or {}).get(key))


# (control, check): each check returns what breaks the control, empty when the spec complies.
CHECKS = [
    ("host namespaces", lambda s: [k for k in ("hostNetwork", "hostPID", "hostIPC") if s.get(k)]),
    ("hostProcess", lambda s: each(s, lambda c: (effective(s, c, "windowsOptions") or {}).get("hostProcess"))),
    ("privileged", lambda s: each(s, lambda c: sc(c).get("privileged"))),
    ("hostPath volumes", lambda s: [v["name"] for v in s.get("volumes", []) if "hostPath" in v]),
    ("host ports", lambda s: each(s, lambda c: any(p.get("hostPort") for p in c.get("ports", [])))),
    (
        "AppArmor",
        lambda s: each(
            s,
            lambda c: (effective(s, c, "appArmorProfile") or {}).get("type", "RuntimeDefault") not in {"RuntimeDefault", "Localhost"},
        ),
    ),
    (
        "SELinux",
        lambda s: each(
            s,
            lambda c: (o := effective(s, c, "seLinuxOptions") or {}).get("type") not in SELINUX_TYPES
            or "user" in o
            or "role" in o,
        ),
    ),
    ("/proc mount", lambda s: each(s, lambda c: sc(c).get("procMount", "Default") != "Default")),
    ("sysctls", lambda s: [x["name"] for x in (s.get("securityContext") or {}).get("sysctls", []) if x["name"] not in SAFE_SYSCTLS]),
    ("volume types", lambda s: [v["name"] for v in s.get("volumes", []) if not set(v) - {"name"} <= ALLOWED_VOLUMES]),
    ("privilege escalation", lambda s: each(s, lambda c: sc(c).get("allowPrivilegeEscalation") is not False)),
    (
        "running as non-root",
        lambda s: each(s, lambda c: effective(s, c, "runAsNonRoot") is not True or sc(c).get("runAsNonRoot") is False),
    ),
    ("running as non-root user", lambda s: each(s, lambda c: effective(s, c, "runAsUser") == 0)),
    (
        "seccomp",
        lambda s: each(s, lambda c: (effective(s, c, "seccompProfile") or {}).get("type") not in {"RuntimeDefault", "Localhost"}),
    ),
    ("capabilities drop ALL", lambda s: each(s, lambda c: "ALL" not in (sc(c).get("capabilities") or {}).get("drop", []))),
    (
        "capabilities add only NET_BIND_SERVICE",
        lambda s: each(s, lambda c: not set((sc(c).get("capabilities") or {}).get("add", [])) <= {"NET_BIND_SERVICE"}),
    ),
]
CHECK_IDS = [name for name, _ in CHECKS]


def chart_pods(case: str) -> list[tuple[str, dict]]:
    return [
        (f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
        for o in render(values_of(case))
        if o["kind"] in WORKLOADS
    ]


def test_the_chart_has_pods_to_check():
    assert [name for name, _ in chart_pods("default")] == ["Deployment/inferpool"]


@pytest.mark.parametrize("control, check", CHECKS, ids=CHECK_IDS)
@pytest.mark.parametrize("case", CASE_IDS)
def test_chart_pods_are_restricted(case, control, check):
    for name, spec in chart_pods(case):
        assert not check(spec), f"{name} breaks {control!r}: {check(spec)}"


@pytest.mark.parametrize("control, check", CHECKS, ids=CHECK_IDS)
@pytest.mark.parametrize("pool_file", POOL_FILES, ids=[f"{p.parent.name}/{p.stem}" for p in POOL_FILES])
def test_operator_pods_are_restricted(pool_file, control, check):
    deployments = [o for o in operator_render(pool_file) if o["kind"] == "Deployment"]
    assert len(deployments) == 1
    spec = deployments[0]["spec"]["template"]["spec"]
    assert not check(spec), f"the pod of {pool_file.name} breaks {control!r}: {check(spec)}"


# A compliant pod, and one change per control that must break it (and no other control, except a
# hostPath volume, which is also a volume type "restricted" refuses): the checks themselves are tested.
GOOD = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [
        {
            "name": "main",
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
    ],
    "volumes": [{"name": "tmp", "emptyDir": {}}],
}
VIOLATIONS = [
    ("host namespaces", lambda s: s.update(hostNetwork=True)),
    ("hostProcess", lambda s: s["securityContext"].update(windowsOptions={"hostProcess": True})),
    ("privileged", lambda s: s["containers"][0]["securityContext"].update(privileged=True)),
    ("hostPath volumes", lambda s: s["volumes"].append({"name": "root", "hostPath": {"path": "/"}})),
    ("host ports", lambda s: s["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}])),
    ("AppArmor", lambda s: s["securityContext"].update(appArmorProfile={"type": "Unconfined"})),
    ("SELinux", lambda s: s["securityContext"].update(seLinuxOptions={"type": "spc_t"})),
    ("/proc mount", lambda s: s["containers"][0]["securityContext"].update(procMount="Unmasked")),
    ("sysctls", lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}])),
    ("volume types", lambda s: s["volumes"].append({"name": "nfs", "nfs": {"server": "x", "path": "/"}})),
    ("privilege escalation", lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation")),
    ("running as non-root", lambda s: s["containers"][0]["securityContext"].update(runAsNonRoot=False)),
    ("running as non-root user", lambda s: s["containers"][0]["securityContext"].update(runAsUser=0)),
    ("seccomp", lambda s: s["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"})),
    ("capabilities drop ALL", lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"])),
    ("capabilities add only NET_BIND_SERVICE", lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"])),
]


ALSO_TRIPS = {"hostPath volumes": {"volume types"}}


def test_every_control_has_a_violation_case():
    assert [name for name, _ in VIOLATIONS] == CHECK_IDS


@pytest.mark.parametrize("control, break_it", VIOLATIONS, ids=[name for name, _ in VIOLATIONS])
def test_checks_catch_violations(control, break_it):
    check = dict(CHECKS)[control]
    assert not check(GOOD)
    spec = copy.deepcopy(GOOD)
    break_it(spec)
    assert check(spec), f"{control!r} missed {spec}"
    others = {name for name, other in CHECKS if name != control and other(spec)}
    assert others <= ALSO_TRIPS.get(control, set()), f"breaking {control!r} also tripped {others}"
