#!/usr/bin/env python3
"""Turns one run of scripts/bench-autoscaling.sh into docs/benchmarks/autoscaling.{md,svg} and autoscaling-results.json.

Reads the run directory the script wrote (.cache/bench/run-autoscaling-*/): meta.json, the load
averages, results.json from tests/examples/bench_autoscaling (the scale part: the operator's CPU
ticks, API requests and memory; the reaction part: per run the times of breach, decision, applied,
created and ready), and the operator's JSON logs. Standard library only; the plot is written as
SVG by hand.

    .cache/venv/bin/python scripts/bench_autoscaling_report.py .cache/bench/run-autoscaling-XXXX --out docs/benchmarks
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench_report import fmt, machine, nice_ceiling, run_args

# The phases of one reaction, as (key, label, colour), in order; each runs from the previous
# phase's end (the breach for the first) to its own time.
PHASES = [
    ("t_decision_s", "breach -> decision", "#d62728"),
    ("t_applied_s", "decision -> Deployment replicas", "#ff7f0e"),
    ("t_created_s", "-> pod created", "#bcbd22"),
    ("t_sidecar_ready_s", "-> sidecar answers /readyz (model load, warm-up)", "#1f77b4"),
    ("t_ready_s", "-> Deployment readyReplicas (probe period)", "#2ca02c"),
]
MIB = 2**20


def log_levels(path: Path) -> dict[str, int]:
    """Lines of a JSON log by level."""
    levels: dict[str, int] = {}
    if not path.exists():
        return levels
    for line in path.read_text(errors="replace").splitlines():
        try:
            level = json.loads(line).get("level", "?")
        except (json.JSONDecodeError, AttributeError):
            level = "not JSON"
        levels[level] = levels.get(level, 0) + 1
    return levels


def scale_result(raw: dict, run: Path) -> dict:
    steady = raw["steady"]
    window = steady["window_s"]
    pools = raw["pools"]
    cpu_core = steady["cpu_s"] / window
    ramp = raw["ramp"]
    return {
        **raw,
        "cpu_percent_of_core": 100 * cpu_core,
        "cpu_percent_of_core_per_pool": 100 * cpu_core / pools,
        "cpu_ms_per_pool_tick": 1000 * steady["cpu_s"] / (pools * window / raw["interval_seconds"]),
        "api_requests_per_s": steady["api_requests"] / window,
        "api_requests_per_pool_per_min": 60 * steady["api_requests"] / window / pools,
        "reconciles_per_s": None if steady["reconciles"] is None else steady["reconciles"] / window,
        "rss_mib": raw["rss_bytes"] / MIB,
        "hwm_mib": raw["hwm_bytes"] / MIB,
        "ramp_cpu_percent_of_core": 100 * ramp["cpu_s"] / raw["all_ready_s"] if raw["all_ready_s"] else None,
        "operator_log_levels": log_levels(run / "operator-scale.log"),
    }


def phase_durations(r: dict) -> dict:
    """Each phase's own duration, from the breach (or the decision when no breach was seen)."""
    out = {}
    prev = r.get("t_breach_s")
    for key, _, _ in PHASES:
        t = r.get(key)
        out[key] = None if t is None or prev is None else t - prev
        if t is not None:
            prev = t
    return out


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def reaction_result(raw: dict, run: Path) -> dict:
    runs = raw["runs"]
    for r in runs:
        r["phases_s"] = phase_durations(r)
        r["decision_to_applied_s"] = r["t_applied_s"] - r["t_decision_s"]
        r["applied_to_created_s"] = r["t_created_s"] - r["t_applied_s"]
        r["created_to_sidecar_ready_s"] = (
            None if r.get("t_sidecar_ready_s") is None else r["t_sidecar_ready_s"] - r["t_created_s"])
        r["sidecar_ready_to_ready_s"] = (
            None if r.get("t_sidecar_ready_s") is None else r["t_ready_s"] - r["t_sidecar_ready_s"])
    keys = ["t_breach_s", "t_decision_s", "t_ready_s", "breach_to_decision_s", "decision_to_ready_s",
            "breach_to_ready_s", "decision_to_applied_s", "applied_to_created_s", "created_to_sidecar_ready_s",
            "sidecar_ready_to_ready_s"]
    return {**raw, "median": {k: median([r.get(k) for r in runs]) for k in keys},
            "operator_log_levels": log_levels(run / "operator-reaction.log")}


# --- SVG -----------------------------------------------------------------------------------------


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_plot(results: dict) -> str:
    """Reaction phases per run as horizontal stacked bars from the breach, then the operator cost table."""
    reaction = results.get("reaction")
    scale = results.get("scale")
    rows = []
    if reaction:
        rows = [(f"run {r['run']}", r) for r in reaction["runs"]]
        med = {"t_breach_s": 0.0}
        t = 0.0
        for key, _, _ in PHASES:
            d = median([r["phases_s"][key] for r in reaction["runs"]])
            t += d or 0.0
            med[key] = t
        med["phases_s"] = phase_durations(med)
        rows.append(("median", med))
    width, left, right = 760, 90, 30
    bar_h, gap = 26, 12
    top = 56
    plot_h = len(rows) * (bar_h + gap)
    legend_y = top + plot_h + 34
    table_y = legend_y + 26 * ((len(PHASES) + 1) // 2) + 30
    table_rows = scale_rows(scale) if scale else []
    height = table_y + (28 + 22 * len(table_rows) if table_rows else 0) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if rows:
        span = max((r.get("t_ready_s") or 0) - (r.get("t_breach_s") or 0) for _, r in rows)
        span = nice_ceiling(max(span, 1.0))
        scale_x = (width - left - right) / span
        out.append(f'<text x="{left}" y="24" font-size="15" font-weight="bold">'
                   'Reaction to an SLA breach (seconds after the breach)</text>')
        out.append(f'<text x="{left}" y="42" fill="#555">one pool, real sidecars, '
                   f'{reaction["workers"]} concurrent no-store requests; target p95 '
                   f'{reaction["spec"]["sla"]["p95LatencyMs"]} ms</text>')
        steps = 5
        for i in range(steps + 1):
            x = left + i * span / steps * scale_x
            out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{top + plot_h - gap + 4}" stroke="#ddd"/>')
            out.append(f'<text x="{x:.1f}" y="{top + plot_h + 10}" text-anchor="middle">{span * i / steps:g}</text>')
        for i, (label, r) in enumerate(rows):
            y = top + i * (bar_h + gap)
            weight = ' font-weight="bold"' if label == "median" else ""
            out.append(f'<text x="{left - 8}" y="{y + bar_h / 2 + 4}" text-anchor="end"{weight}>{esc(label)}</text>')
            breach = r.get("t_breach_s")
            if breach is None:
                out.append(f'<text x="{left + 4}" y="{y + bar_h / 2 + 4}" fill="#900">no breach observed</text>')
                continue
            start = 0.0
            for key, name, colour in PHASES:
                d = r["phases_s"].get(key)
                if d is None:
                    continue
                x0, w = left + max(start, 0.0) * scale_x, max(d, 0.0) * scale_x
                if w > 0:
                    out.append(f'<rect x="{x0:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
                               f'<title>{esc(name)}: {d:.2f} s</title></rect>')
                start += d
            total = r["t_ready_s"] - breach
            out.append(f'<text x="{left + max(start, 0) * scale_x + 4:.1f}" y="{y + bar_h / 2 + 4}">'
                       f'{total:.1f} s</text>')
        for i, (_, name, colour) in enumerate(PHASES):
            x = left + (i % 2) * 330
            y = legend_y + (i // 2) * 26 - 12
            out.append(f'<rect x="{x}" y="{y}" width="14" height="14" fill="{colour}"/>')
            out.append(f'<text x="{x + 20}" y="{y + 11}">{esc(name)}</text>')
    if table_rows:
        out.append(f'<text x="{left}" y="{table_y}" font-size="15" font-weight="bold">'
                   f'Operator cost, {scale["pools"]} autoscaled pools (fake pods)</text>')
        for i, (k, v) in enumerate(table_rows):
            y = table_y + 24 + 22 * i
            if i % 2 == 0:
                out.append(f'<rect x="{left - 6}" y="{y - 15}" width="{width - left - right + 6}" height="22" fill="#f3f3f3"/>')
            out.append(f'<text x="{left}" y="{y}">{esc(k)}</text>')
            out.append(f'<text x="{width - right - 6}" y="{y}" text-anchor="end" font-weight="bold">{esc(v)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def scale_rows(s: dict) -> list[tuple[str, str]]:
    return [
        (f"time until all {s['pools']} pools are Ready", f"{s['all_ready_s']:.1f} s"),
        (f"CPU over {s['steady']['window_s']:.0f} s of steady state", f"{s['cpu_percent_of_core']:.1f} % of one core"),
        ("CPU per pool", f"{s['cpu_percent_of_core_per_pool']:.3f} % of a core ({s['cpu_ms_per_pool_tick']:.2f} ms per tick)"),
        ("API requests to the API server", f"{s['api_requests_per_s']:.2f} /s"),
        ("RSS at the end (VmRSS / VmHWM)", f"{s['rss_mib']:.1f} / {s['hwm_mib']:.1f} MiB"),
    ]


# --- Markdown ------------------------------------------------------------------------------------


def secs(v, digits=2) -> str:
    return fmt(v, digits, " s")


def markdown(results: dict) -> str:
    meta, mach = results["meta"], results["machine"]
    scale, reaction = results.get("scale"), results.get("reaction")
    dirty = " (with uncommitted changes)" if meta.get("git_dirty") else ""
    pools = f"{scale['pools']} pools" if scale else "many pools"
    lines = [
        f"# Autoscaling benchmark: operator cost with {pools}, reaction to an SLA breach",
        "",
        f"Generated by `make bench` (or `make bench-autoscaling` alone), which runs `scripts/bench-autoscaling.sh` "
        f"(the example `tests/examples/bench_autoscaling/`) and then scripts/bench_autoscaling_report.py, on "
        f"{meta['started_utc']}, commit `{meta['git_commit']}`{dirty}. Raw numbers: "
        "[autoscaling-results.json](autoscaling-results.json); plot: [autoscaling.svg](autoscaling.svg). "
        "What the autoscaler does: [docs/autoscaling.md](../autoscaling.md) (the rules) and "
        "[docs/operator.md](../operator.md#the-autoscaler-inside-the-operator) (the loop).",
        "",
        "## Machine",
        "",
        f"- CPUs: {mach.get('nproc')} (`nproc`), {mach.get('cpu_model', 'unknown')}; memory "
        f"{mach.get('memory_gib', '?')} GiB; Linux {mach.get('kernel', '?')}",
        f"- Load average (1/5/15 min) at start: {meta['loadavg_start']}; at end: {meta['loadavg_end']}",
        f"- {meta['rustc']}; CPU time from `/proc/<pid>/stat` (utime + stime) at {meta['clk_tck']} ticks/s "
        "(`getconf CLK_TCK`), memory from `/proc/<pid>/status`.",
        "",
        "The API server double, the kubelet double, the load and the benchmark's pollers run in one process "
        "(`target/release/examples/bench_autoscaling`); the operator (`target/release/inferpool-operator run "
        "--leader-election false --log-format json --listen 127.0.0.1:PORT`, KUBECONFIG at the double, no proxy "
        "variables) and, in the reaction part, the sidecars are their own processes. All share these CPUs; "
        "nothing crosses a network. The numbers are for this machine only.",
        "",
        "![reaction phases per run and the operator's cost](autoscaling.svg)",
        "",
    ]
    if scale:
        lines += scale_markdown(scale, meta)
    if reaction:
        lines += reaction_markdown(reaction, meta)
    lines += [
        "## Reproduce",
        "",
        "```sh",
        "make bench-autoscaling        # or: scripts/bench-autoscaling.sh",
        "```",
        "",
        f"This run: `{meta['command']}` with BENCH_AUTOSCALING_POOLS={meta['pools']}, "
        f"BENCH_AUTOSCALING_SETTLE_SECONDS={meta['settle_seconds']}, "
        f"BENCH_AUTOSCALING_STEADY_SECONDS={meta['steady_seconds']}, BENCH_AUTOSCALING_RUNS={meta['runs']}, "
        f"BENCH_AUTOSCALING_WORKERS={meta['workers']}, BENCH_AUTOSCALING_P95_MS={meta['p95_ms']}, "
        f"BENCH_IMAGE={meta['image']}. Raw files stay in `.cache/bench/run-autoscaling-*/`: results.json, "
        "scale.json, reaction.json, each run's SLA samples (`reaction-N-sla.jsonl`) and both operator logs.",
        "",
    ]
    return "\n".join(lines)


def scale_markdown(s: dict, meta: dict) -> list[str]:
    steady = s["steady"]
    ramp = s["ramp"]
    by = sorted(steady["api_by"].items(), key=lambda kv: -kv[1])
    levels = ", ".join(f"{k} {v}" for k, v in sorted(s["operator_log_levels"].items())) or "none"
    lines = [
        f"## Operator cost with {s['pools']} pools",
        "",
        f"{s['pools']} InferencePools `{{replicas: {{min: 1}}, autoscaling: {{enabled: true, intervalSeconds: "
        f"{s['interval_seconds']}}}}}` are created one after the other on a fake-mode kubelet (a pod is Running and "
        "Ready as soon as it exists, and runs nothing). The operator starts before them with an empty cluster. After "
        f"all are Ready the benchmark waits {s['settle_seconds']} s, then measures a steady-state window of "
        f"{steady['window_s']:.1f} s in which it makes no request to the API server itself (it reads the double's "
        "store directly) and reads the operator's /metrics every 5 s.",
        "",
        "| | value |",
        "|---|---|",
        f"| time from the first create until all {s['pools']} pools are Ready | {secs(s['all_ready_s'])} "
        f"(the creates themselves took {secs(s['create_s'])}) |",
        f"| operator CPU while they became Ready | {fmt(ramp['cpu_s'], 2, ' s')} "
        f"({fmt(s['ramp_cpu_percent_of_core'], 1, ' %')} of one core) |",
        f"| operator API requests while they became Ready | {ramp['api_requests_operator']:,} "
        f"(+ the benchmark's {s['pools']} creates) |",
        f"| **operator CPU in steady state** | **{s['cpu_percent_of_core']:.2f} % of one core** "
        f"({steady['cpu_s']:.2f} s CPU in {steady['window_s']:.1f} s) |",
        f"| per pool | {s['cpu_percent_of_core_per_pool']:.4f} % of a core; {s['cpu_ms_per_pool_tick']:.3f} ms CPU "
        f"per pool per tick ({s['interval_seconds']} s interval) |",
        f"| **API requests in steady state** | **{s['api_requests_per_s']:.2f} /s** "
        f"({steady['api_requests']:,} in the window; {s['api_requests_per_pool_per_min']:.2f} per pool per minute) |",
        f"| reconciles in steady state | {fmt(s['reconciles_per_s'], 2, ' /s')} "
        "(`inferpool_operator_reconcile_total`) |",
        f"| **RSS at the end** | **{s['rss_mib']:.1f} MiB** (VmRSS); peak {s['hwm_mib']:.1f} MiB (VmHWM) |",
        f"| objects at the end | {s['deployments']} Deployments, {s['pods']} pods |",
        f"| operator log lines by level (whole part) | {levels} |",
        "",
        "API requests are counted on the API double's side: it logs every request it serves as `api` "
        "(method, path, query); the benchmark counts those events in its own process (a long watch counts once, "
        "when it starts). In the steady window they were, by method and resource:",
        "",
        "| request | count | per second |",
        "|---|---|---|",
    ]
    lines += [f"| `{k}` | {v:,} | {v / steady['window_s']:.2f} |" for k, v in by] or ["| none | 0 | 0 |"]
    lines.append("")
    if steady["reconciles"]:
        per_pool_min = 60 * steady["reconciles"] / steady["window_s"] / s["pools"]
        lines += [
            f"Nearly all of them come from reconciles: {steady['api_requests'] / steady['reconciles']:.1f} requests "
            f"per reconcile, {per_pool_min:.1f} reconciles per pool per minute (one every {60 / per_pool_min:.0f} s). "
            "Nothing changes in these pools, yet the autoscaler queues each one for a reconcile every 10 s to "
            "refresh its figures ([docs/operator.md](../operator.md#the-autoscaler-inside-the-operator)), taken at "
            f"the next {s['interval_seconds']} s tick, and each reconcile reads the pool's children and "
            "server-side applies them unchanged (it writes no status when nothing moved). That refresh, not the "
            "SLA reads, is the operator's main steady-state load on the API server.",
            "",
        ]
    lines += [
        "**Fake pods never answer.** Every tick the collector reads each ready pod's `/api/v1/metrics/sla` at its "
        "IP (127.0.0.x:8080 here); a fake pod runs nothing, so each read is refused at connect and the pod counts "
        "as silent (unhealthy, no capacity). The loop's HTTP cost measured here is therefore one refused "
        "connection per pod per tick, cheaper than a real read (a request, a JSON answer of a few hundred bytes, "
        "parsing it), and the policy decides on silent pools. Read the CPU figures as the operator's fixed cost "
        "per pool (watches, the tick, the decision, status) rather than the full cost of pools under load.",
        "",
    ]
    return lines


def reaction_markdown(r: dict, meta: dict) -> list[str]:
    spec = r["spec"]
    auto = spec["autoscaling"]
    m = r["median"]
    runs = r["runs"]
    levels = ", ".join(f"{k} {v}" for k, v in sorted(r["operator_log_levels"].items())) or "none"
    lines = [
        "## Reaction to an SLA breach",
        "",
        f"One pool of real sidecars (process mode: each pod is a `target/release/inferpool-sidecar` process) with "
        f"`replicas: {{min: 1, max: {spec['replicas']['max']}}}`, `batching.auto: false`, `sla.p95LatencyMs: "
        f"{spec['sla']['p95LatencyMs']}` and `autoscaling: {{intervalSeconds: {auto['intervalSeconds']}, "
        f"stableWindowSeconds: {auto['stableWindowSeconds']}, panicWindowSeconds: {auto['panicWindowSeconds']}, "
        f"scaleDownDelaySeconds: {auto['scaleDownDelaySeconds']}}}`. When it is Ready with one replica and has "
        f"idled 3 s, {r['workers']} closed-loop workers send `POST /api/v1/embed` with `Cache-Control: no-store` "
        f"(every request runs the model) of `{r['image']}` ({r['image_bytes']:,} bytes) round robin to the ready "
        "endpoints. One replica cannot answer that within the target. Times are from the moment the load "
        "starts (t0):",
        "",
        "- **breach**: the first poll (every 100 ms, each ready pod's `/api/v1/metrics/sla`) in which a replica's "
        "own 2 s window p95 exceeds the target;",
        "- **decision**: the pool's `status.desiredReplicas` first rises;",
        "- **applied**: the Deployment's `spec.replicas` reaches that number; **created**: the pool has that many pods;",
        "- **sidecar ready**: a new pod's sidecar first answers `/readyz` itself (polled every 100 ms);",
        "- **ready**: the Deployment's `status.readyReplicas` reaches that number.",
        "",
        "Object times come from the double's change feed (a watch without HTTP), so observing costs the "
        f"operator nothing. {len(runs)} run{'s' if len(runs) != 1 else ''}, each on a fresh pool (the previous one deleted and its pods gone).",
        "",
        "| run | breach (p95 then) | decision | replicas | ready | breach -> decision | decision -> ready | "
        "**breach -> ready** | requests ok / failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in runs:
        p95 = f" ({x['breach_p95_ms']:.0f} ms)" if x.get("breach_p95_ms") is not None else ""
        lines.append(
            f"| {x['run']} | {secs(x.get('t_breach_s'))}{p95} | {secs(x['t_decision_s'])} | "
            f"{x['replicas_before']} -> {x['replicas_decided']} | {secs(x['t_ready_s'])} | "
            f"{secs(x.get('breach_to_decision_s'))} | {secs(x['decision_to_ready_s'])} | "
            f"**{secs(x.get('breach_to_ready_s'))}** | {x['requests_ok']:,} / {x['requests_failed']:,} |")
    lines += [
        f"| **median** | {secs(m['t_breach_s'])} | {secs(m['t_decision_s'])} | | {secs(m['t_ready_s'])} | "
        f"**{secs(m['breach_to_decision_s'])}** | **{secs(m['decision_to_ready_s'])}** | "
        f"**{secs(m['breach_to_ready_s'])}** | |",
        "",
        "Decision to ready, split (median): the reconcile writes the Deployment "
        f"{secs(m['decision_to_applied_s'], 3)} after the decision; the kubelet double creates the pod "
        f"{secs(m['applied_to_created_s'], 3)} later; the new sidecar answers `/readyz` "
        f"{secs(m['created_to_sidecar_ready_s'])} after that; the Deployment counts it ready "
        f"{secs(m['sidecar_ready_to_ready_s'])} later.",
        "",
        "The operator's reasons for the first decision of each run (`status.lastDecision`):",
        "",
    ]
    for x in runs:
        d = x.get("decision") or {}
        lines.append(f"- run {x['run']}: `{d.get('action', '?')}`: {d.get('reason', '?')}")
    lines += [
        "",
        f"Operator log lines by level over the whole part: {levels}.",
        "",
        "### Where the time goes",
        "",
        f"- **Breach to decision.** The operator reads the pods every `intervalSeconds` ({auto['intervalSeconds']} s; "
        "its loop wakes every 250 ms to find the due pools) and decides on the panic window "
        f"({auto['panicWindowSeconds']} s): it scales up at once only when that window needs at least twice the "
        "current capacity, and the pod's own 2 s window fills with slow requests gradually. So a decision comes "
        "within one or two ticks of the breach; the breach seen by the benchmark's 100 ms poll can also come "
        "after the decision when the policy already sees the queue and throughput exceed capacity.",
        "- **Decision to Deployment.** The runner hands the decision to the reconciler (`reconcile_on`), which "
        "writes the Deployment's replicas by server-side apply: milliseconds.",
        "- **Pod to sidecar ready.** The kubelet double starts a new sidecar process, which loads the ONNX model "
        "and runs its warm-up inferences before `/readyz` answers. On this machine that happens while the "
        "existing replica is saturated by the load on the same cores, so the start-up is slower than on an "
        "idle machine.",
        "- **Sidecar ready to Deployment ready.** The pod's readiness probe (`/readyz` every 5 s, as the operator "
        "builds it, with a startup probe before it) decides when the pod counts as ready: up to a probe period "
        "after the sidecar is.",
        "",
        f"**On a {meta['nproc']}-core machine the replicas share the same cores.** A second or third replica adds "
        "no CPU, so the p95 does not come back under the target here; this benchmark measures how fast the "
        "operator reacts, not whether capacity is restored (the simulator in `operator/tests/autoscale_sim.rs` "
        "shows the SLA restored when new replicas bring capacity; see docs/autoscaling.md). The pool may therefore "
        "keep scaling to its max while the load runs.",
        "",
    ]
    return lines


def main() -> None:
    run, out, meta = run_args(__doc__, "scripts/bench-autoscaling.sh")
    raw = json.loads((run / "results.json").read_text())
    results = {"meta": meta, "machine": machine()}
    if "scale" in raw:
        results["scale"] = scale_result(raw["scale"], run)
    if "reaction" in raw:
        results["reaction"] = reaction_result(raw["reaction"], run)
    if "scale" not in results and "reaction" not in results:
        raise SystemExit(f"{run}: no results")
    listen = run / "listen-8080"
    if listen.exists() and listen.read_text().strip():
        results["meta"]["listening_on_8080"] = listen.read_text().strip()
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoscaling-results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "autoscaling.svg").write_text(svg_plot(results))
    (out / "autoscaling.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
