#!/usr/bin/env python3
"""Turns one run of scripts/bench-cache.sh into docs/benchmarks/cache.{md,svg} and cache-results.json.

Reads the run directory the script wrote (.cache/bench/run-cache-*/): meta.json, and per phase
(miss, memory, disk, redis) the oha JSON and its CPU time, the sidecar's /metrics and Redis's
INFO stats before and after, CPU counters, the check request's answer, and the same for the short
concurrency-1 run after the phase. Standard library only; the plot is written as SVG by hand.

    .cache/venv/bin/python scripts/bench_cache_report.py .cache/bench/run-cache-XXXX --out docs/benchmarks
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

# The parsing of oha's JSON and of /metrics is the sidecar benchmark's; one copy of each.
from bench_report import fmt, nice_ceiling, oha_stats, parse_metrics, run_args

# phase -> (the `cache` field its check request must show, the tier every request should hit)
PHASES = {
    "miss": ("bypass", None),
    "memory": ("memory", "memory"),
    "disk": ("disk", "disk"),
    "redis": ("redis", "redis"),
}
TIERS = ("memory", "disk", "redis")
SIDECAR = {"miss": "A", "memory": "A", "disk": "B", "redis": "C"}
TARGET_L1_RATIO = 10.0
TARGET_L1_P99_MS = 2.0
TARGET_L3_P99_MS = 5.0

LABEL = re.compile(r'(\w+)="([^"]*)"')


def by_label(metrics: dict[str, float], name: str) -> dict[tuple, float]:
    """{'name{a="x",b="y"}': v} -> {(('a','x'),('b','y')): v} for one metric name."""
    out = {}
    for key, value in metrics.items():
        if key == name or key.startswith(name + "{"):
            out[tuple(sorted(LABEL.findall(key)))] = value
    return out


def labelled_deltas(before: dict, after: dict, name: str, outer: str, inner: str) -> dict[str, dict[str, float]]:
    """Change of a labelled counter during a phase: {outer label: {inner label: n}}, zeros left out."""
    b = by_label(before, name)
    out: dict[str, dict[str, float]] = {}
    for labels, value in by_label(after, name).items():
        d = dict(labels)
        n = value - b.get(labels, 0.0)
        if n:
            out.setdefault(d.get(outer, "?"), {})[d.get(inner, "?")] = n
    return out


def lookup_means(before: dict, after: dict) -> dict[str, float]:
    """Mean time of one lookup per tier during a phase, from inferpool_cache_lookup_duration_seconds."""
    out = {}
    sums = by_label(after, "inferpool_cache_lookup_duration_seconds_sum")
    counts = by_label(after, "inferpool_cache_lookup_duration_seconds_count")
    sums0 = by_label(before, "inferpool_cache_lookup_duration_seconds_sum")
    counts0 = by_label(before, "inferpool_cache_lookup_duration_seconds_count")
    for labels, total in sums.items():
        n = counts.get(labels, 0.0) - counts0.get(labels, 0.0)
        if n:
            out[dict(labels).get("tier", "?")] = (total - sums0.get(labels, 0.0)) * 1e3 / n
    return out


def redis_stats(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if value.isdigit():
            out[key] = int(value)
    return out


def machine() -> dict:
    """Static facts about this machine, from /proc."""
    info: dict = {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["cpu_model"] = value.strip()
                break
    except OSError:
        pass
    info.setdefault("cpu_model", "unknown")
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1))
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, AttributeError):
        pass
    info["kernel"] = os.uname().release
    return info


def load_run(prefix: Path) -> dict | None:
    """One oha run with its counters: the measured phase, or its concurrency-1 companion."""
    oha_path = Path(f"{prefix}.oha.json")
    if not oha_path.exists():
        return None
    stats = oha_stats(json.loads(oha_path.read_text()))
    before = parse_metrics(Path(f"{prefix}.metrics-before").read_text())
    after = parse_metrics(Path(f"{prefix}.metrics-after").read_text())
    cpu = json.loads(Path(f"{prefix}.cpu.json").read_text())
    oha_cpu = Path(f"{prefix}.oha.json.time").read_text().split()
    rb = redis_stats(Path(f"{prefix}.redis-before").read_text())
    ra = redis_stats(Path(f"{prefix}.redis-after").read_text())
    codes = stats["status_codes"]
    answered = sum(codes.values())
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    duration = stats["duration_s"] or cpu["wall_s"]
    wall = cpu["wall_s"]
    oha_cpu_s = float(oha_cpu[1]) + float(oha_cpu[2])
    other = max(0.0, cpu["machine_busy_cpu_s"] - cpu["server_cpu_s"] - cpu["redis_cpu_s"] - oha_cpu_s)
    return {
        **stats,
        "connections": cpu["connections"],
        "answered": answered,
        "requests_per_s": answered / duration if duration else None,
        "ok": ok,
        "ok_per_s": ok / duration if duration else None,
        "non_2xx": answered - ok,
        "inferences": int(round(after.get("inferpool_images_embedded_total", 0.0)
                                - before.get("inferpool_images_embedded_total", 0.0))),
        # {tier: {hit|miss|skipped: n}} from inferpool_cache_requests_total.
        "cache": {t: {r: int(round(n)) for r, n in rs.items()} for t, rs in
                  labelled_deltas(before, after, "inferpool_cache_requests_total", "tier", "result").items()},
        # {tier: {corrupt|timeout|...: n}} from inferpool_cache_errors_total.
        "cache_errors": {t: {k: int(round(n)) for k, n in ks.items()} for t, ks in
                         labelled_deltas(before, after, "inferpool_cache_errors_total", "tier", "kind").items()},
        "lookup_mean_ms": lookup_means(before, after),
        "coalesced": int(round(after.get("inferpool_cache_coalesced_total", 0.0)
                               - before.get("inferpool_cache_coalesced_total", 0.0))),
        "redis_circuit_after": {None: "no Redis tier", 0: "closed", 1: "open", 2: "half-open"}.get(
            None if 'inferpool_cache_circuit_state{tier="redis"}' not in after
            else int(after['inferpool_cache_circuit_state{tier="redis"}']), "unknown"),
        "redis_keyspace_hits": ra.get("keyspace_hits", 0) - rb.get("keyspace_hits", 0),
        "redis_keyspace_misses": ra.get("keyspace_misses", 0) - rb.get("keyspace_misses", 0),
        "redis_commands": ra.get("total_commands_processed", 0) - rb.get("total_commands_processed", 0),
        "wall_s": wall,
        "server_cpu_cores": cpu["server_cpu_s"] / wall,
        "oha_cpu_cores": oha_cpu_s / wall,
        "redis_cpu_cores": cpu["redis_cpu_s"] / wall,
        "other_cpu_cores": other / wall,
        "machine_busy_cores": cpu["machine_busy_cpu_s"] / wall,
        "server_cpu_us_per_request": cpu["server_cpu_s"] * 1e6 / answered if answered else None,
        "loadavg_after": cpu["loadavg"],
    }


def phase_result(run: Path, name: str) -> dict | None:
    main = load_run(run / name)
    if main is None:
        return None
    want_answer, tier = PHASES[name]
    check = run / f"{name}.check.json"
    answer = json.loads(check.read_text()).get("cache") if check.exists() else None
    tries = run / f"{name}.check-tries"
    hits = {t: main["cache"].get(t, {}).get("hit", 0) for t in TIERS}
    result = {
        "phase": name,
        "sidecar": SIDECAR[name],
        "flags": (run / f"sidecar-{SIDECAR[name]}.flags").read_text().strip()
        if (run / f"sidecar-{SIDECAR[name]}.flags").exists() else "",
        "expected_answer": want_answer,
        "check_answer": answer,
        "check_tries": int(tries.read_text()) if tries.exists() else 1,
        "tier": tier,
        **main,
        "hits": hits,
        # Share of answered requests served by the tier the phase is about (None for the miss phase).
        "tier_hit_share": hits[tier] / main["answered"] if tier and main["answered"] else None,
        "c1": load_run(run / f"{name}-c1"),
    }
    return result


def times(n: int) -> str:
    return "once" if n == 1 else f"{n:,} times"


def run_oddities(label: str, tier: str | None, r: dict) -> list[str]:
    """What one oha run's counters say against the tier it was meant to hit (None: the model)."""
    out = []
    if r["non_2xx"] or r["transport_errors"]:
        codes = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["status_codes"].items()) if not k.startswith("2"))
        errors = ", ".join(f"{k}: {v:,}" for k, v in r["error_distribution"].items()) or "none"
        text = (f"{label}: {r['non_2xx']:,} non-2xx answers ({codes}) and {r['transport_errors']:,} transport "
                f"errors ({errors}).")
        if r["status_codes"].get("504") and r["ok_per_s"]:
            text += (f" 504 is the sidecar's answer to a request past its deadline (default 2000 ms): with "
                     f"{r['connections']} connections each holding one request, a request waits about "
                     f"{r['connections']} / {r['ok_per_s']:.0f} per second = {r['connections'] / r['ok_per_s']:.1f} s "
                     "on average, so the slowest pass it.")
        out.append(text)
    if tier is None:
        # Every 2xx must have run the model; a 504 may have expired in the queue before it ran.
        if r["inferences"] < r["ok"]:
            out.append(f"{label}: {r['ok']:,} answers 2xx but only {r['inferences']:,} inferences; "
                       "some requests did not run the model.")
        if r["cache"]:
            out.append(f"{label}: `no-store` requests still looked up the cache: {r['cache']}.")
        return out
    not_hits = r["answered"] - r["cache"].get(tier, {}).get("hit", 0)
    if not_hits:
        res = r["cache"].get(tier, {})
        parts = []
        if res.get("miss"):
            parts.append(f"{res['miss']:,} {tier} misses")
        if res.get("skipped"):
            parts.append(f"{res['skipped']:,} {tier} lookups skipped")
        errs = r["cache_errors"].get(tier)
        if errs:
            parts.append(f"{tier} errors: " + ", ".join(f"{k} {n:,}" for k, n in sorted(errs.items())))
        text = (f"{label}: {not_hits:,} of {r['answered']:,} answers ({not_hits / r['answered']:.2%}) were "
                f"not {tier} hits ({', '.join(parts) or 'no tier counter says why'}); the model ran "
                f"{times(r['inferences'])} and {r['coalesced']:,} requests shared those runs (coalesced).")
        if tier == "redis" and res.get("skipped"):
            text += (f" Redis lookups took {fmt(r['lookup_mean_ms'].get('redis'), 2)} ms on average at "
                     f"{r['connections']} connection(s). A lookup is skipped (and the request goes on to the "
                     "model) when the circuit breaker is open, or when its whole wait, the queue to the "
                     "sidecar's Redis reader plus the `MGET`, exceeds the budget (`--redis-timeout-ms`, "
                     "default 20 ms); only an `MGET` that itself runs past the budget is counted as a "
                     "`timeout` error, and three of those in a row open the breaker. Circuit state after "
                     f"the run: {r['redis_circuit_after']}.")
        out.append(text)
    elif r["inferences"]:
        out.append(f"{label}: the model ran {times(r['inferences'])} during a run that should run it never.")
    return out


def oddities(phases: dict[str, dict]) -> list[str]:
    """Anything in the counters that contradicts what a phase claims to measure."""
    out = []
    for name, p in phases.items():
        if p["check_answer"] != p["expected_answer"]:
            out.append(f"`{name}`: the check request answered `\"cache\":\"{p['check_answer']}\"`, "
                       f"expected `{p['expected_answer']}`.")
        out += run_oddities(f"`{name}`", p["tier"], p)
        if p["c1"]:
            out += run_oddities(f"`{name}` at 1 connection", p["tier"], p["c1"])
        if p["check_tries"] > 1:
            out.append(f"`{name}`: the check request needed {p['check_tries']} tries before it answered "
                       f"`{p['tier']}` (write-behind or connection not yet there).")
    return out


# --- SVG -----------------------------------------------------------------------------------------


def log_axis(lo: float, hi: float) -> tuple[float, float]:
    lo = max(lo, 1e-3)
    return math.floor(math.log10(lo)), math.ceil(math.log10(hi * 1.6))


def tick_label(v: float) -> str:
    return f"{v:g}" if v < 1e4 else f"{v:.0e}".replace("e+0", "e")


def short(v: float) -> str:
    """A bar's value in at most about five characters: 0.16, 3.4, 52, 2,033, 9.3k, 12k."""
    if v >= 10_000:
        return f"{v / 1e3:.0f}k"
    if v >= 3_000:
        return f"{v / 1e3:.1f}k"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.2g}"


def svg_plot(phases: dict[str, dict]) -> str:
    names = list(phases)
    width, height = 920, 460
    top, bottom = 70, 70
    ph = height - top - bottom
    panels = [(80, 370), (540, 370)]  # (left, width) of each panel
    blue, light_blue, red, light_red, grey = "#1f77b4", "#9ecae1", "#d62728", "#f4a6a6", "#555555"
    e = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">'
         "inferpool sidecar: the same image, cache miss vs a hit in each tier</text>"]

    def panel(left, pw, title, series, unit, targets):
        """series: [(label, colour, [value per phase])]; log-scale bars, one group per phase."""
        values = [v for _, _, vs in series for v in vs if v]
        lo_exp, hi_exp = log_axis(min(values), max(values))

        def y(v):
            return top + ph - (math.log10(max(v, 10 ** lo_exp)) - lo_exp) / (hi_exp - lo_exp) * ph

        e.append(f'<text x="{left + pw / 2}" y="{top - 24}" text-anchor="middle" font-size="13" '
                 f'font-weight="bold">{title}</text>')
        for k in range(lo_exp, hi_exp + 1):
            v = 10 ** k
            e.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + pw}" y2="{y(v):.1f}" stroke="#e5e5e5"/>')
            e.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{tick_label(v)}</text>')
        e.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
        e.append(f'<text transform="translate({left - 52} {top + ph / 2}) rotate(-90)" '
                 f'text-anchor="middle">{unit} (log scale)</text>')
        group = pw / len(names)
        bar = group * 0.7 / len(series)
        for i, name in enumerate(names):
            gx = left + i * group + group * 0.15
            e.append(f'<text x="{left + (i + 0.5) * group:.1f}" y="{top + ph + 18}" text-anchor="middle">'
                     f"{name}</text>")
            for j, (_, colour, vs) in enumerate(series):
                v = vs[i]
                if not v:
                    continue
                x0 = gx + j * bar
                e.append(f'<rect x="{x0:.1f}" y="{y(v):.1f}" width="{bar - 2:.1f}" '
                         f'height="{top + ph - y(v):.1f}" fill="{colour}"/>')
                e.append(f'<text x="{x0 + bar / 2 - 1:.1f}" y="{y(v) - 4:.1f}" text-anchor="middle" '
                         f'font-size="11">{short(v)}</text>')
        for name, v, label in targets:
            if name not in names:
                continue
            i = names.index(name)
            x0, x1 = left + i * group + 4, left + (i + 1) * group - 4
            e.append(f'<line x1="{x0:.1f}" y1="{y(v):.1f}" x2="{x1:.1f}" y2="{y(v):.1f}" stroke="{grey}" '
                     'stroke-dasharray="5 3" stroke-width="1.5"/>')
            # A white halo keeps the label readable where it crosses a bar.
            e.append(f'<text x="{x1:.1f}" y="{y(v) + 13:.1f}" text-anchor="end" fill="{grey}" font-size="10" '
                     f'stroke="white" stroke-width="3" paint-order="stroke">{label}</text>')
        # Legend under the panel.
        for j, (label, colour, _) in enumerate(series):
            lx = left + j * (pw / max(1, len(series)))
            e.append(f'<rect x="{lx:.1f}" y="{top + ph + 34}" width="12" height="12" fill="{colour}"/>')
            e.append(f'<text x="{lx + 17:.1f}" y="{top + ph + 44}">{label}</text>')

    conc = next(iter(phases.values()))["connections"]
    miss = phases.get("miss")
    thr_series = [(f"{conc} connections", blue, [phases[n]["requests_per_s"] for n in names])]
    if all(phases[n]["c1"] for n in names):
        thr_series.append(("1 connection", light_blue, [phases[n]["c1"]["requests_per_s"] for n in names]))
    thr_targets = []
    if miss and miss["requests_per_s"]:
        thr_targets.append(("memory", miss["requests_per_s"] * TARGET_L1_RATIO, f"target {TARGET_L1_RATIO:g}x miss"))
    panel(*panels[0], "requests per second", thr_series, "requests/s", thr_targets)
    p99_series = [(f"p99, {conc} connections", red, [phases[n]["latency_ms"]["p99"] for n in names])]
    if all(phases[n]["c1"] for n in names):
        p99_series.append(("p99, 1 connection", light_red, [phases[n]["c1"]["latency_ms"]["p99"] for n in names]))
    panel(*panels[1], "p99 latency", p99_series, "ms",
          [("memory", TARGET_L1_P99_MS, f"target {TARGET_L1_P99_MS:g} ms"),
           ("redis", TARGET_L3_P99_MS, f"target {TARGET_L3_P99_MS:g} ms")])
    e.append("</svg>")
    return "\n".join(e) + "\n"


# --- Markdown ------------------------------------------------------------------------------------


def met(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def targets(phases: dict[str, dict]) -> list[dict]:
    out = []
    miss, mem, red = phases.get("miss"), phases.get("memory"), phases.get("redis")
    if miss and mem and miss["requests_per_s"]:
        ratio = mem["requests_per_s"] / miss["requests_per_s"]
        out.append({"target": f"L1-hit throughput >= {TARGET_L1_RATIO:g}x cache-miss throughput",
                    "measured": ratio, "unit": "x", "met": ratio >= TARGET_L1_RATIO})
    if mem:
        p99 = mem["latency_ms"]["p99"]
        out.append({"target": f"L1-hit p99 <= {TARGET_L1_P99_MS:g} ms", "measured": p99, "unit": "ms",
                    "met": p99 is not None and p99 <= TARGET_L1_P99_MS,
                    "c1_measured": mem["c1"]["latency_ms"]["p99"] if mem["c1"] else None})
    if red:
        p99 = red["latency_ms"]["p99"]
        out.append({"target": f"L3-hit (Redis) p99 <= {TARGET_L3_P99_MS:g} ms on loopback", "measured": p99,
                    "unit": "ms", "met": p99 is not None and p99 <= TARGET_L3_P99_MS,
                    "c1_measured": red["c1"]["latency_ms"]["p99"] if red["c1"] else None})
    return out


def markdown(results: dict) -> str:
    meta, mach, phases = results["meta"], results["machine"], results["phases"]
    conc = meta["concurrency"]
    lines: list[str] = []
    w = lines.append
    w("# Cache benchmark: cache miss vs a hit in each tier")
    w("")
    w(f"Generated by `make bench` (or `make bench-cache` alone), which runs `{meta['command']}` and then "
      f"scripts/bench_cache_report.py, on {meta['started_utc']}, commit `{meta['git_commit']}`. Raw numbers: "
      "[cache-results.json](cache-results.json); plot: [cache.svg](cache.svg). What the cache does: "
      "[docs/cache.md](../cache.md).")
    w("")
    w("## Machine")
    w("")
    w(f"- CPUs: {meta.get('nproc', mach.get('nproc'))} (`nproc`), {mach.get('cpu_model', 'unknown')}; "
      f"memory {mach.get('memory_gib', '?')} GiB; Linux {mach.get('kernel', '?')}")
    w(f"- Load average (1/5/15 min) at start: {meta['loadavg_start']}; at end: {meta['loadavg_end']}")
    busiest = max(phases.values(), key=lambda p: p["other_cpu_cores"])
    w(f"- CPU used by other processes while the load ran: at most {busiest['other_cpu_cores']:.2f} cores "
      f"(in the {busiest['phase']} phase); see the `other` column under CPU"
      + (" (the machine was otherwise idle)." if busiest["other_cpu_cores"] < 0.1 else
         ": other work shared the CPUs, so treat the numbers as a lower bound."))
    w(f"- Load generator: {meta['oha']} on the same machine; {meta['redis']}; {meta['rustc']}")
    w("")
    w("oha, the sidecar and redis-server all share these CPUs; nothing crosses a network. The numbers "
      "are for this machine only.")
    w("")
    w("## Setup")
    w("")
    w(f"- Image: `{meta['image']}` ({meta['image_bytes']:,} bytes, the JPEG of the sidecar benchmark), sent "
      f"as `POST /api/v1/embed` with `Content-Type: image/jpeg` by {conc} keep-alive connections for "
      f"{meta['phase_seconds']} s per phase (`oha --no-tui --output-format json -c {conc} -z "
      f"{meta['phase_seconds']}s`); requests still in flight at the end are waited for.")
    w(f"- Every sidecar: `target/release/inferpool-sidecar --threads {meta['threads']} "
      "--shutdown-grace-seconds 5` on 127.0.0.1 with its own fresh `--data-dir`, otherwise defaults "
      "(L1 1000 entries, L2 1024 MiB, f32 entries). One sidecar runs at a time.")
    w("- redis-server on 127.0.0.1 with `--save \"\" --appendonly no` (no persistence to compete for CPU).")
    w("")
    w("| phase | sidecar | its cache flags | requests | check request answered |")
    w("|---|---|---|---|---|")
    how = {
        "miss": "`Cache-Control: no-store`: the model runs on every request, nothing is stored",
        "memory": "plain, after one warm request stored the entry",
        "disk": "plain, after one warm request stored the entry",
        "redis": "plain; the entry is the one sidecar A stored in Redis",
    }
    for name, p in phases.items():
        flags = re.sub(r"redis://\S+", "redis://127.0.0.1:PORT", p["flags"]) or "-"
        w(f"| {name} | {p['sidecar']} | `{flags}` | {how[name]} | `\"cache\":\"{p['check_answer']}\"` |")
    w("")
    w("Before each phase one request (curl) checks the answer's `cache` field; the run stops if it is "
      "not the phase's tier. The sidecar's `/metrics` before and after each phase give the inferences "
      "(`inferpool_images_embedded_total`) and cache hits (`inferpool_cache_requests_total`) of the phase.")
    w("")
    w(f"## Results at {conc} connections")
    w("")
    w("| phase | requests/s | p50 ms | p99 ms | 2xx | non-2xx | transport errors | inferences run "
      "| memory hits | disk hits | redis hits | other lookups (by tier) | coalesced | mean lookup µs of the tier |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for name, p in phases.items():
        lat = p["latency_ms"]
        other = "; ".join(f"{t}: " + ", ".join(f"{r} {n:,}" for r, n in sorted(rs.items()) if r != "hit")
                          for t, rs in p["cache"].items() if any(r != "hit" for r in rs)) or "-"
        errors = "; ".join(f"{t} errors: " + ", ".join(f"{k} {n:,}" for k, n in sorted(ks.items()))
                           for t, ks in p["cache_errors"].items())
        if errors:
            other += f"; {errors}"
        lookup = p["lookup_mean_ms"].get(p["tier"]) if p["tier"] else None
        lookup_us = None if lookup is None else lookup * 1e3
        w(f"| {name} | {fmt(p['requests_per_s'])} | {fmt(lat['p50'], 2)} | {fmt(lat['p99'], 2)} | {p['ok']:,} | "
          f"{p['non_2xx']:,} | {p['transport_errors']:,} | {p['inferences']:,} | {p['hits']['memory']:,} | "
          f"{p['hits']['disk']:,} | {p['hits']['redis']:,} | {other} | {p['coalesced']:,} | {fmt(lookup_us, 1)} |")
    w("")
    w("Latencies are oha's, from the client's side, over all responses. Inferences, hits, other lookup "
      "results, cache errors and coalesced requests are the change of the sidecar's counters over the "
      "phase (the check request before it is not counted). With L1 off (`--memory-entries 0`) every "
      "lookup still counts as an L1 miss first. `mean lookup µs` is from "
      "`inferpool_cache_lookup_duration_seconds` of the phase's tier, inside the sidecar.")
    w("")
    w("![throughput and p99 latency per phase](cache.svg)")
    w("")
    miss = phases.get("miss")
    w("### Throughput against the cache miss")
    w("")
    w("| ratio | requests/s | x |")
    w("|---|---:|---:|")
    for name in ("memory", "disk", "redis"):
        if name in phases and miss and miss["requests_per_s"]:
            w(f"| {name} / miss | {fmt(phases[name]['requests_per_s'])} / {fmt(miss['requests_per_s'])} | "
              f"{phases[name]['requests_per_s'] / miss['requests_per_s']:,.1f} |")
    w("")
    w("### CPU")
    w("")
    w(f"On this {meta.get('nproc', '?')}-CPU machine oha itself competes with the sidecar for the CPUs "
      "(its time from `/usr/bin/time`); in cores, CPU-seconds per second of the phase:")
    w("")
    w("| phase | sidecar | oha | redis-server | other | machine busy | sidecar CPU µs per request |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    for name, p in phases.items():
        w(f"| {name} | {fmt(p['server_cpu_cores'], 2)} | {fmt(p['oha_cpu_cores'], 2)} | "
          f"{fmt(p['redis_cpu_cores'], 2)} | {fmt(p['other_cpu_cores'], 2)} | {fmt(p['machine_busy_cores'], 2)} | "
          f"{fmt(p['server_cpu_us_per_request'], 0)} |")
    w("")
    hit_phases = [p for p in phases.values() if p["tier"]]
    if hit_phases:
        top_oha = max(hit_phases, key=lambda p: p["oha_cpu_cores"])
        share = top_oha["oha_cpu_cores"] / max(top_oha["oha_cpu_cores"] + top_oha["server_cpu_cores"], 1e-9)
        w(f"In the hit phases the sidecar does little per request, so the load generator takes a large share "
          f"of the two CPUs: up to {top_oha['oha_cpu_cores']:.2f} cores for oha against "
          f"{top_oha['server_cpu_cores']:.2f} for the sidecar ({top_oha['phase']} phase, {share:.0%} of the CPU "
          "the two used). The hit throughputs above are therefore bounded by the machine running both "
          "sides, not by the sidecar alone; in the miss phase oha's share is negligible.")
        w("")
    if all(p["c1"] for p in phases.values()):
        w("### One connection")
        w("")
        w(f"After each phase, {meta['latency_seconds']} s with a single connection: the latency of a request "
          "that does not wait behind others.")
        w("")
        w("| phase | requests/s | p50 ms | p99 ms | inferences run | hits in the phase's tier |")
        w("|---|---:|---:|---:|---:|---:|")
        for name, p in phases.items():
            c1 = p["c1"]
            tier_hits = f'{c1["cache"].get(p["tier"], {}).get("hit", 0):,}' if p["tier"] else "-"
            w(f"| {name} | {fmt(c1['requests_per_s'])} | {fmt(c1['latency_ms']['p50'], 2)} | "
              f"{fmt(c1['latency_ms']['p99'], 2)} | {c1['inferences']:,} | {tier_hits} |")
        w("")
    w("## Targets")
    w("")
    for t in results["targets"]:
        unit = t["unit"]
        measured = f"{t['measured']:,.1f}x" if unit == "x" else f"{fmt(t['measured'], 2)} ms"
        line = f"- {t['target']}: measured {measured} at {conc} connections: {met(t['met'])}."
        if t.get("c1_measured") is not None:
            line += f" (At 1 connection: p99 {t['c1_measured']:.2f} ms.)"
        w(line)
    w("")
    lat_targets = [t for t in results["targets"] if t["unit"] == "ms"]
    mem = phases.get("memory")
    if lat_targets and mem and mem["requests_per_s"]:
        little = conc / mem["requests_per_s"] * 1e3
        w(f"At {conc} connections each connection has one request in flight, so by Little's law the mean "
          f"latency is {conc} / throughput: {little:.2f} ms at the memory phase's "
          f"{mem['requests_per_s']:,.0f} requests/s. A p99 under {TARGET_L1_P99_MS:g} ms at {conc} "
          f"connections needs more than {conc / TARGET_L1_P99_MS * 1e3:,.0f} requests/s; the latency "
          "targets are about the time of one request, which the one-connection table shows.")
        w("")
    odd = results["oddities"]
    w("## Checks")
    w("")
    if odd:
        for o in odd:
            w(f"- {o}")
    else:
        w("- Every check request answered from the expected tier; the miss phase ran the model for every "
          "request; every hit phase (and its one-connection run) ran it 0 times and served every request "
          "from its tier; "
          "no non-2xx answer and no transport error.")
    w("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    run, out, meta = run_args(__doc__, "scripts/bench-cache.sh")
    phases = {name: r for name in PHASES if (r := phase_result(run, name)) is not None}
    if not phases:
        raise SystemExit(f"{run}: no phase results")
    miss = phases.get("miss")
    ratios = {f"{n}/miss": phases[n]["requests_per_s"] / miss["requests_per_s"]
              for n in ("memory", "disk", "redis") if n in phases and miss and miss["requests_per_s"]}
    results = {"meta": meta, "machine": machine(), "phases": phases, "ratios": ratios,
               "targets": targets(phases), "oddities": oddities(phases)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache-results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "cache.svg").write_text(svg_plot(phases))
    (out / "cache.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
