"""The chart's alert rules pass `promtool check rules`, and the PrometheusRule the chart renders
carries exactly those groups."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from chart_support import ALERTS, one, render, values_of

def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    # `make setup` installs it (Debian package `prometheus`): missing is a broken setup, not a skip.
    assert promtool is not None, "promtool is missing: run `make setup` (Debian package `prometheus`)"
    out = subprocess.run([promtool, "check", "rules", ALERTS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_rule_carries_the_file_groups():
    rule = one(render(values_of("monitoring-values")), "PrometheusRule")
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert groups, "the rules file has no groups"
    assert rule["spec"]["groups"] == groups
