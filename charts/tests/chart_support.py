"""Shared by the chart's tests: where things are, rendering the chart with the Helm Go SDK
(helm-python-sdk, no helm binary), and what the operator itself renders for a pool."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "inferpool"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
GENERATED_CRD = ROOT / "crds" / "inferencepool.yaml"
ALERTS = CHART / "files" / "alerts.rules.yaml"
DASHBOARD = CHART / "dashboards" / "inferpool.json"
# Where `cargo test --workspace` (run first by `make test`) put the operator: CARGO_TARGET_DIR when
# set, else target/ in the checkout.
OPERATOR = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target") / "debug" / "inferpool-operator"
# Pools the operator renders: the user-facing examples and the operator's own test fixtures (one
# of which asks for privilege in an extra container, which the operator must take away).
POOL_FILES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "operator" / "tests" / "fixtures").glob("*.yaml"))

RELEASE = "inferpool"
NAMESPACE = "inferpool-system"

# (case id, values) for every render: the defaults and each ci/*.yaml.
CASES = [("default", {})] + [(p.stem, yaml.safe_load(p.read_text()) or {}) for p in CI_VALUES]
CASE_IDS = [case for case, _ in CASES]


def values_of(case: str) -> dict:
    return dict(CASES)[case]


def render(values: dict, name: str = RELEASE, namespace: str = NAMESPACE) -> list[dict]:
    """Every object the chart's templates produce (CRDs excluded), in template order."""
    manifests = helm.Chart.load(CHART).render(values, name=name, namespace=namespace, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: dict) -> str:
    manifests = helm.Chart.load(CHART).render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def chart_crds() -> list[dict]:
    """The CRDs Helm installs from the chart's crds/ directory, as Helm loads them."""
    return [{"filename": c["filename"], "data": c["data"]} for c in helm.Chart.load(CHART).crds]


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def operator_render(pool_file: Path, values: dict | None = None, check: bool = True):
    """What `inferpool-operator render -f POOL` prints (the objects the operator would apply), run
    with the image flags the chart gives the operator for `values`. With `check=False`, the
    finished process instead."""
    if not OPERATOR.exists():
        message = (
            f"{OPERATOR} is missing: build it with `cargo build -p inferpool-operator` "
            "(`make test` runs `cargo test --workspace` first, which builds it)"
        )
        # make test sets this: there the operator's Deployments must be checked, never skipped.
        if os.environ.get("INFERPOOL_REQUIRE_OPERATOR") == "1":
            pytest.fail(message)
        pytest.skip(message)
    args = next(c for c in one(render(values or {}), "Deployment", "inferpool")["spec"]["template"]["spec"]["containers"] if c["name"] == "operator")["args"]
    images = [a for a in args if a.startswith(("--default-image=", "--gpu-image="))]
    out = subprocess.run([OPERATOR, "render", "-f", pool_file, *images], capture_output=True, text=True, timeout=60)
    if not check:
        return out
    assert out.returncode == 0, f"render -f {pool_file.name} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
