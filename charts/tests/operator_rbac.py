"""Prints the operator's RBAC rules as the chart renders them with its default values, as JSON:
{"cluster": [rules of the ClusterRole], "leader": {"namespace": ..., "rules": [...]}}.
tests/tests/operator/main.rs enforces them on the operator in its end-to-end tests, and
tests/tests/operator/rbac.rs checks that each granted verb is one the operator used."""

import json

from chart_support import one, render

objects = render({})
role = one(objects, "ClusterRole", "inferpool")
leader = one(objects, "Role", "inferpool-leader-election")
print(json.dumps({"cluster": role["rules"], "leader": {"namespace": leader["metadata"]["namespace"], "rules": leader["rules"]}}))
