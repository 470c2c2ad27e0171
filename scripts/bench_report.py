#!/usr/bin/env python3
"""Turns one run of scripts/bench-sidecar.sh into docs/benchmarks/sidecar.{md,svg,-results.json}.

Reads the run directory the script wrote (.cache/bench/run-*/): meta.json, engine.json, and per
concurrency level the oha JSON, the sidecar's /metrics before and after, and CPU time counters.
Standard library only; the plot is written as SVG by hand.

    .cache/venv/bin/python scripts/bench_report.py .cache/bench/run-XXXX --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
from pathlib import Path

# Status codes the sidecar gives by design under overload: queue full, deadline passed.
BY_DESIGN = {"429", "504"}
TARGET_RATIO = 0.9
SATURATED_CONNECTIONS = 1000

METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}, labels sorted as written."""
    out = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def delta(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def code_deltas(before: dict, after: dict, route: str) -> dict[str, int]:
    """Requests answered on `route` during the level, by status code, from inferpool_requests_total."""
    codes = {}
    for key, value in after.items():
        if not key.startswith("inferpool_requests_total{") or f'route="{route}"' not in key:
            continue
        code = re.search(r'code="(\d+)"', key)
        if code:
            n = int(round(value - before.get(key, 0.0)))
            if n:
                codes[code.group(1)] = n
    return codes


def parse_net(text: str) -> dict[str, int]:
    """/proc/net/netstat + /proc/net/snmp (header line, value line pairs) -> {'TcpExt.ListenOverflows': n}."""
    out = {}
    lines = text.splitlines()
    for names, values in zip(lines, lines[1:]):
        prefix, _, names = names.partition(":")
        vprefix, _, values = values.partition(":")
        if prefix != vprefix or not values.split() or not values.split()[0].lstrip("-").isdigit():
            continue
        for name, value in zip(names.split(), values.split()):
            if value.lstrip("-").isdigit():
                out[f"{prefix}.{name}"] = int(value)
    return out


# Kernel TCP counters worth reading when clients see connection errors (system-wide counters).
NET_COUNTERS = {
    "TcpExt.ListenOverflows": "accept queue full",
    "TcpExt.ListenDrops": "SYNs dropped at a listener",
    "TcpExt.TCPAbortOnData": "closed with unread data (RST)",
    "TcpExt.TCPAbortOnClose": "closed by the application with unread data (RST)",
    "Tcp.EstabResets": "established connections reset",
}


def machine() -> dict:
    """Static facts about this machine."""
    info = {"nproc": os.cpu_count()}
    try:
        info["nproc"] = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, ValueError, subprocess.CalledProcessError):
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                info["cpu_model"] = value.strip()
            elif key.strip() in ("Thread(s) per core", "CPU max MHz"):
                info[key.strip().lower().replace(" ", "_").replace("(s)", "s")] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        info["cpu_model"] = "unknown"
    try:
        meminfo = Path("/proc/meminfo").read_text()
        kib = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1))
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, AttributeError):
        pass
    info["kernel"] = os.uname().release
    return info


def oha_stats(oha: dict) -> dict:
    """The numbers wanted from one oha JSON report (its latencies are in seconds)."""
    summary = oha.get("summary", {})
    codes = {str(k): int(v) for k, v in (oha.get("statusCodeDistribution") or {}).items()}
    errors = {str(k): int(v) for k, v in (oha.get("errorDistribution") or {}).items()}
    pct = oha.get("latencyPercentiles") or {}
    ok_pct = oha.get("latencyPercentilesSuccessful") or {}

    def ms(table: dict, key: str):
        v = table.get(key)
        return None if v is None else v * 1e3

    return {
        "duration_s": summary.get("total"),
        "oha_requests_per_s": summary.get("requestsPerSec"),
        "status_codes": codes,
        "transport_errors": sum(errors.values()),
        "error_distribution": errors,
        "latency_ms": {q: ms(pct, q) for q in ("p50", "p95", "p99")},
        "latency_ok_ms": {q: ms(ok_pct, q) for q in ("p50", "p95", "p99")},
        "latency_max_ms": None if summary.get("slowest") is None else summary["slowest"] * 1e3,
        # oha's "DNSDialup": DNS lookup plus TCP connect, once per connection.
        "connect_ms": {k: v * 1e3 for k, v in ((oha.get("details") or {}).get("DNSDialup") or {}).items()},
    }


def level_result(run: Path, c: int, engine: dict) -> dict:
    prefix = run / f"level-{c}"
    oha = json.loads(Path(f"{prefix}.oha.json").read_text())
    stats = oha_stats(oha)
    before = parse_metrics(Path(f"{prefix}.metrics-before").read_text())
    after = parse_metrics(Path(f"{prefix}.metrics-after").read_text())
    cpu = json.loads(Path(f"{prefix}.cpu.json").read_text())
    oha_cpu = Path(f"{prefix}.oha.json.time").read_text().split()
    net = {}
    if Path(f"{prefix}.net-before").exists():
        nb = parse_net(Path(f"{prefix}.net-before").read_text())
        na = parse_net(Path(f"{prefix}.net-after").read_text())
        net = {k: na.get(k, 0) - nb.get(k, 0) for k in NET_COUNTERS}
    idle = Path(f"{prefix}.queue-depth-idle")
    queue_depth_idle = float(idle.read_text()) if idle.exists() and idle.read_text().strip() else None
    duration = stats["duration_s"] or cpu["wall_s"]
    codes = stats["status_codes"]
    answered = sum(codes.values())
    ok = codes.get("200", 0)
    batches = delta(before, after, "inferpool_batch_size_count")
    images = delta(before, after, "inferpool_batch_size_sum")
    inference_s = delta(before, after, "inferpool_inference_duration_seconds_sum")
    queue_wait_n = delta(before, after, "inferpool_queue_wait_seconds_count")
    queue_wait_s = delta(before, after, "inferpool_queue_wait_seconds_sum")
    oha_cpu_s = float(oha_cpu[1]) + float(oha_cpu[2])
    wall = cpu["wall_s"]
    other_cpu_s = max(0.0, cpu["machine_busy_cpu_s"] - cpu["server_cpu_s"] - oha_cpu_s)
    return {
        "concurrency": c,
        **stats,
        "requests": answered + stats["transport_errors"],
        "responses_per_s": answered / duration if duration else None,
        "ok": ok,
        "ok_per_s": ok / duration if duration else None,
        "status_429": codes.get("429", 0),
        "status_504": codes.get("504", 0),
        "other_status": {k: v for k, v in codes.items() if k not in {"200", "429", "504"}},
        "sidecar_status_codes": code_deltas(before, after, "embed"),
        "batches": int(batches),
        "images_inferred": int(images),
        "mean_batch": images / batches if batches else None,
        "session_busy": inference_s / wall if wall else None,
        "ms_per_batch_mean": inference_s * 1e3 / batches if batches else None,
        "in_server_images_per_inference_s": images / inference_s if inference_s else None,
        "queue_wait_mean_ms": queue_wait_s * 1e3 / queue_wait_n if queue_wait_n else None,
        "server_cpu_cores": cpu["server_cpu_s"] / wall,
        "server_cpu_ms_per_ok": cpu["server_cpu_s"] * 1e3 / ok if ok else None,
        "oha_cpu_cores": oha_cpu_s / wall,
        # Every answered request was decoded and normalised first (429 and 504 included).
        "preprocess_cores_est": (answered / duration) * engine["preprocess_ms_per_image_mean"] / 1e3
        if duration else None,
        "other_cpu_cores": other_cpu_s / wall,
        "machine_busy_cores": cpu["machine_busy_cpu_s"] / wall,
        "loadavg_after": cpu["loadavg"],
        "tcp_counters": net,
        "queue_depth_gauge_after_level": after.get("inferpool_queue_depth"),
        "queue_depth_gauge_when_idle": queue_depth_idle,
    }


def fmt(v, digits=1, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:,.{digits}f}{unit}"


# --- SVG -----------------------------------------------------------------------------------------


def svg_plot(levels: list[dict], raw_ips: float) -> str:
    width, height = 820, 480
    left, right, top, bottom = 80, 90, 60, 70
    pw, ph = width - left - right, height - top - bottom
    xs = [lv["concurrency"] for lv in levels]
    x_lo, x_hi = math.log10(min(xs)), math.log10(max(xs))
    if x_hi - x_lo < 1e-9:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    pad = 0.05 * (x_hi - x_lo)
    x_lo, x_hi = x_lo - pad, x_hi + pad

    def x(c):
        return left + (math.log10(c) - x_lo) / (x_hi - x_lo) * pw

    # Only 200s are plotted: refusals (429/504) at high concurrency come back fast and would dwarf them.
    thr = [lv["ok_per_s"] or 0.0 for lv in levels]
    y_max_left = nice_ceiling(max(thr + [raw_ips]) * 1.25)
    p95 = [lv["latency_ms"]["p95"] for lv in levels]
    y_max_right = nice_ceiling(max([v for v in p95 if v is not None] + [1.0]) * 1.1)

    def yl(v):
        return top + ph - v / y_max_left * ph

    def yr(v):
        return top + ph - v / y_max_right * ph

    blue, red, grey = "#1f77b4", "#d62728", "#555555"
    e = []
    e.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">')
    e.append(f'<rect width="{width}" height="{height}" fill="white"/>')
    e.append(f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">'
             "inferpool sidecar: HTTP throughput and p95 latency vs concurrency</text>")
    # Grid and left axis ticks.
    for i in range(6):
        v = y_max_left * i / 5
        y = yl(v)
        e.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        e.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end" fill="{blue}">{v:g}</text>')
        vr = y_max_right * i / 5
        e.append(f'<text x="{left + pw + 8}" y="{y + 4:.1f}" text-anchor="start" fill="{red}">{vr:g}</text>')
    for c in xs:
        e.append(f'<line x1="{x(c):.1f}" y1="{top}" x2="{x(c):.1f}" y2="{top + ph}" stroke="#f0f0f0"/>')
        e.append(f'<text x="{x(c):.1f}" y="{top + ph + 18}" text-anchor="middle">{c}</text>')
    e.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    e.append(f'<text x="{left + pw / 2}" y="{height - 22}" text-anchor="middle">'
             "concurrent connections (log scale)</text>")
    e.append(f'<text transform="translate(22 {top + ph / 2}) rotate(-90)" text-anchor="middle" fill="{blue}">'
             "throughput (requests/s)</text>")
    e.append(f'<text transform="translate({width - 22} {top + ph / 2}) rotate(90)" text-anchor="middle" '
             f'fill="{red}">p95 latency (ms)</text>')
    # Raw engine reference.
    y = yl(raw_ips)
    e.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="{grey}" '
             'stroke-dasharray="6 4" stroke-width="1.5"/>')
    e.append(f'<text x="{left + 6}" y="{y - 6:.1f}" fill="{grey}">raw engine {raw_ips:.1f} images/s</text>')
    y90 = yl(raw_ips * TARGET_RATIO)
    e.append(f'<line x1="{left}" y1="{y90:.1f}" x2="{left + pw}" y2="{y90:.1f}" stroke="{grey}" '
             'stroke-dasharray="2 4" stroke-width="1"/>')
    e.append(f'<text x="{left + 6}" y="{y90 + 14:.1f}" fill="{grey}">target {TARGET_RATIO:g}x raw</text>')

    def polyline(values, ymap, colour, dash=""):
        pts = " ".join(f"{x(c):.1f},{ymap(v):.1f}" for c, v in zip(xs, values) if v is not None)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        e.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        for c, v in zip(xs, values):
            if v is not None:
                e.append(f'<circle cx="{x(c):.1f}" cy="{ymap(v):.1f}" r="3.5" fill="{colour}"/>')

    polyline(thr, yl, blue)
    polyline(p95, yr, red)
    # Legend.
    lx, ly = left + 12, top + 16
    legend = [
        (blue, "", "200 OK per second (left axis)"),
        (red, "", "p95 latency, all responses (right axis)"),
        (grey, "6 4", "raw engine images/s"),
    ]
    e.append(f'<rect x="{lx - 6}" y="{ly - 12}" width="270" height="{len(legend) * 17 + 6}" '
             'fill="white" fill-opacity="0.85" stroke="#ccc"/>')
    for i, (colour, dash, label) in enumerate(legend):
        yy = ly + i * 17
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        e.append(f'<line x1="{lx}" y1="{yy - 4}" x2="{lx + 24}" y2="{yy - 4}" stroke="{colour}" '
                 f'stroke-width="2"{dash_attr}/>')
        e.append(f'<text x="{lx + 30}" y="{yy}">{label}</text>')
    e.append("</svg>")
    return "\n".join(e) + "\n"


def nice_ceiling(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above v (axes with round ticks)."""
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


# --- Markdown ------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    meta, mach, eng = results["meta"], results["machine"], results["engine"]
    levels, summary = results["levels"], results["summary"]
    raw = eng["images_per_s"]
    lines = []
    w = lines.append
    w("# Sidecar benchmark: HTTP path vs the raw engine")
    w("")
    w(f"Generated by `{meta['command']}` (scripts/bench-sidecar.sh, then scripts/bench_report.py) "
      f"on {meta['started_utc']}, commit `{meta['git_commit']}`. Raw numbers: "
      "[sidecar-results.json](sidecar-results.json); plot: [sidecar.svg](sidecar.svg).")
    w("")
    w("## Machine")
    w("")
    w(f"- CPUs: {mach.get('nproc')} ({mach.get('cpu_model', 'unknown')}, "
      f"{mach.get('threads_per_core', '?')} thread(s) per core); memory {mach.get('memory_gib', '?')} GiB; "
      f"Linux {mach.get('kernel', '?')}")
    w(f"- Load average (1/5/15 min) at start: {meta['loadavg_start']}; at end: {meta['loadavg_end']}")
    busiest = max(levels, key=lambda lv: lv["other_cpu_cores"])
    w(f"- CPU used by other processes while the load ran: at most {busiest['other_cpu_cores']:.2f} cores "
      f"(at concurrency {busiest['concurrency']}); see the `other CPU` column below"
      + (" (the machine was otherwise idle)." if busiest["other_cpu_cores"] < 0.1 else
         ": other work shared the CPUs, so treat the numbers as a lower bound."))
    w("- The load average at the end counts the run's own threads: at high concurrency hundreds of "
      "preprocessing threads of the sidecar's blocking pool are runnable at once.")
    w(f"- Load generator: {meta['oha']} on the same machine (its CPU is in the `oha CPU` column); "
      f"{meta['rustc']}")
    w("")
    w("The load generator, the sidecar and the raw engine all share these CPUs; nothing crosses a "
      "network. The numbers are for this machine only.")
    w("")
    w("## Setup")
    w("")
    w(f"- Model `{eng['model']}`, variant {eng['variant']}, provider {eng['provider']}, optimisation "
      f"{eng['optimization']}; {meta['threads']} intra-op threads in both the raw engine and the sidecar "
      f"(`--threads {meta['threads']}`), batch {meta['batch']} (`--max-batch {meta['batch']}`, the default).")
    img = eng["image"]
    size = img.get("width_height") or ["?", "?"]
    w(f"- Image: `{meta['image']}`, {size[0]}x{size[1]} JPEG (quality 90) of {img['bytes']:,} bytes, "
      "from scikit-image's astronaut.png; every request sends it with `Content-Type: image/jpeg` and "
      "`Cache-Control: no-store` (the model runs every time and nothing is cached).")
    w(f"- HTTP: `POST /api/v1/embed` on 127.0.0.1, {meta['level_seconds']} s per level, keep-alive "
      "connections, requests still in flight at the end are waited for (oha "
      "`--wait-ongoing-requests-after-deadline`). Sidecar defaults otherwise: queue capacity 1024, "
      "default deadline 2000 ms, max delay 5 ms, one session.")
    w("")
    w("## Raw engine")
    w("")
    w("`cargo run --release -p inferpool-sidecar --example engine_bench` "
      f"(batch {eng['batch']}, {eng['threads']} threads, {eng['seconds']:.0f} s after a warm-up):")
    w("")
    w("| images/s | ms/batch p50 | ms/batch p95 | CPU ms/image | preprocess ms/image p50 | preprocess ms/image mean |")
    w("|---:|---:|---:|---:|---:|---:|")
    cpu_img = eng.get("cpu_seconds_per_image")
    w(f"| {raw:.1f} | {eng['ms_per_batch_p50']:.1f} | {eng['ms_per_batch_p95']:.1f} | "
      f"{fmt(cpu_img * 1e3 if cpu_img else None)} | {eng['preprocess_ms_per_image_p50']:.2f} | "
      f"{eng['preprocess_ms_per_image_mean']:.2f} |")
    w("")
    w("Preprocessing is decode + resize to 224x224 + normalise, on one thread, with the model idle. "
      "CPU ms/image is the process's user+system time over the timed inference run divided by the "
      "images, so it counts every intra-op thread (busy or spinning).")
    w("")
    w("## HTTP, per concurrency level")
    w("")
    w("| connections | responses/s | 200/s | p50 ms | p95 ms | p99 ms | p95 ms of 200s | 200 | 429 | 504 | other "
      "| transport errors | mean batch | session busy | server CPU | preprocessing CPU (est.) | oha CPU | other CPU |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lv in levels:
        lat = lv["latency_ms"]
        other = ", ".join(f"{k}: {v}" for k, v in sorted(lv["other_status"].items())) or "0"
        w(f"| {lv['concurrency']} | {fmt(lv['responses_per_s'])} | {fmt(lv['ok_per_s'])} | {fmt(lat['p50'])} | "
          f"{fmt(lat['p95'])} | {fmt(lat['p99'])} | {fmt(lv['latency_ok_ms']['p95'])} | {lv['ok']:,} | "
          f"{lv['status_429']:,} | {lv['status_504']:,} | {other} | {lv['transport_errors']:,} | "
          f"{fmt(lv['mean_batch'])} | "
          f"{fmt(lv['session_busy'] * 100 if lv['session_busy'] is not None else None, 0, '%')} | "
          f"{fmt(lv['server_cpu_cores'], 2)} | {fmt(lv['preprocess_cores_est'], 2)} | "
          f"{fmt(lv['oha_cpu_cores'], 2)} | {fmt(lv['other_cpu_cores'], 2)} |")
    w("")
    w("Latency percentiles are over all responses (200 and 429/504) as oha measures them, from the "
      "client's side, and include the TCP connect of each connection's first request. `mean batch` is the change of `inferpool_batch_size_sum` over the change of "
      "`inferpool_batch_size_count` on the admin `/metrics` during the level; `session busy` is the "
      "change of `inferpool_inference_duration_seconds_sum` over the level's wall time (the share of time "
      "the one session thread spent inside the model). CPU columns are in cores (CPU-seconds per "
      "second): the sidecar process, oha, and everything else on the machine; `preprocessing CPU (est.)` "
      "is responses per second times the raw run's preprocessing cost per image, since every request is "
      "decoded before it is queued or refused.")
    w("")
    w("![throughput and p95 latency vs concurrency](sidecar.svg)")
    w("")
    w("Per level, from the sidecar's own counters:")
    w("")
    w("| connections | images inferred | 200 answered | inferred but not answered 200 | in-server images/s of inference "
      "| ms/batch mean | queue wait mean ms | server CPU ms per 200 |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lv in levels:
        w(f"| {lv['concurrency']} | {lv['images_inferred']:,} | {lv['ok']:,} | "
          f"{max(0, lv['images_inferred'] - lv['ok']):,} | {fmt(lv['in_server_images_per_inference_s'])} | "
          f"{fmt(lv['ms_per_batch_mean'])} | {fmt(lv['queue_wait_mean_ms'])} | {fmt(lv['server_cpu_ms_per_ok'])} |")
    w("")
    w("Kernel TCP counters during each level (system-wide, so other programs can add to them) and the "
      "sidecar's `inferpool_queue_depth` gauge once the level had ended and no batch had run for a second:")
    w("")
    w("| connections | " + " | ".join(f"{k.split('.')[1]} ({v})" for k, v in NET_COUNTERS.items())
      + " | connect ms mean / max | queue-depth gauge when idle |")
    w("|---:|" + "---:|" * (len(NET_COUNTERS) + 2))
    for lv in levels:
        net = lv["tcp_counters"]
        conn = lv["connect_ms"]
        w(f"| {lv['concurrency']} | " + " | ".join(f"{net.get(k, '-')}" for k in NET_COUNTERS)
          + f" | {fmt(conn.get('average'))} / {fmt(conn.get('slowest'))}"
          + f" | {fmt(lv['queue_depth_gauge_when_idle'], 0)} |")
    w("")
    w("## Against the targets")
    w("")
    best = summary["saturation_level"]
    w(f"- HTTP throughput at saturation: **{summary['http_ok_per_s']:.1f} req/s** answered 200 (best level: "
      f"{best} connections), against **{raw:.1f} images/s** from the raw engine: ratio "
      f"**{summary['ratio']:.2f}x**. Target >= {TARGET_RATIO:g}x: **{'met' if summary['ratio_met'] else 'NOT met'}**.")
    sat = summary.get("at_1000")
    if sat is None:
        w(f"- {SATURATED_CONNECTIONS} connections: not measured in this run.")
    else:
        w(f"- At {SATURATED_CONNECTIONS} connections: {sat['requests']:,} requests, {sat['ok']:,} answered 200, "
          f"{sat['status_429']:,} 429, {sat['status_504']:,} 504, other codes {sat['other_status'] or 'none'}, "
          f"{sat['transport_errors']:,} transport errors. Target \"zero transport errors and every request "
          f"answered (200, or 429/504 by design)\": **{'met' if summary['saturation_met'] else 'NOT met'}**.")
        if sat["error_distribution"]:
            w(f"  Transport errors: {sat['error_distribution']}.")
    w("")
    w("## Why the HTTP path differs from the raw engine")
    w("")
    for para in explain(results):
        w(para)
        w("")
    return "\n".join(lines).rstrip() + "\n"


def explain_speed(busy: float, slowdown: float) -> str:
    """What the session thread's busy share and its speed against the raw engine say."""
    if busy < 0.9:
        return ("The session thread was idle part of the time, so a batch was not always waiting when it "
                "finished one: the stages before the batcher (HTTP, preprocessing) did not keep up.")
    if slowdown < 0.95:
        return ("The model is kept busy, so what is lost is speed per batch: the intra-op threads share the "
                "CPUs with preprocessing, the HTTP runtime and the load generator.")
    return ("The model is kept busy and runs at least as fast per image as in the raw run, so the HTTP path "
            "loses nothing to the engine itself here.")


def explain(results: dict) -> list[str]:
    """Plain statements derived from the measurements."""
    eng, levels, summary = results["engine"], results["levels"], results["summary"]
    cores = results["meta"]["threads"]
    nproc = results["machine"].get("nproc") or cores
    raw = eng["images_per_s"]
    pre_ms = eng["preprocess_ms_per_image_mean"]
    cpu_img_ms = (eng.get("cpu_seconds_per_image") or cores / raw) * 1e3
    out = []
    # CPU budget: every request costs preprocessing CPU on the same cores the model uses.
    ceiling = nproc / ((cpu_img_ms + pre_ms) / 1e3)
    ceiling = min(ceiling, raw)
    out.append(
        f"**CPU budget.** The raw engine keeps {cores} threads on {nproc} CPUs for {cpu_img_ms:.1f} CPU-ms per "
        f"image. Each HTTP request adds {pre_ms:.2f} ms of preprocessing (decode + resize + normalise, "
        f"mean of the single-thread loop), which runs on the same {nproc} CPUs as inference: "
        f"{pre_ms / (cpu_img_ms + pre_ms) * 100:.1f}% of the CPU per image. If every CPU-millisecond were "
        f"spent on either, the sidecar could at best reach about {ceiling:.1f} images/s "
        f"({ceiling / raw:.2f}x raw) before any HTTP, JSON or load-generator cost. That is a rough "
        "bound: the engine's CPU time includes its intra-op threads spin-waiting between operators, time "
        "the kernel can give to preprocessing instead."
    )
    best = next(lv for lv in levels if lv["concurrency"] == summary["saturation_level"])
    if best["in_server_images_per_inference_s"]:
        slowdown = best["in_server_images_per_inference_s"] / raw
        out.append(
            f"**Inference under load.** At {best['concurrency']} connections the session thread was inside "
            f"the model {best['session_busy'] * 100:.0f}% of the time with batches of {best['mean_batch']:.1f} "
            f"images, and ran {best['in_server_images_per_inference_s']:.1f} images per second of inference "
            f"({best['ms_per_batch_mean']:.0f} ms per batch), {slowdown:.2f}x the raw engine's rate. "
            f"The sidecar process used {best['server_cpu_cores']:.2f} cores, oha {best['oha_cpu_cores']:.2f}, "
            f"other processes {best['other_cpu_cores']:.2f}. "
            + explain_speed(best["session_busy"], slowdown)
        )
    single = next((lv for lv in levels if lv["concurrency"] == 1), None)
    if single and single["in_server_images_per_inference_s"]:
        out.append(
            f"**Batching.** At 1 connection (batches of {single['mean_batch']:.1f}) the model ran "
            f"{single['in_server_images_per_inference_s']:.1f} images per second of inference, against "
            f"{raw:.1f} for the raw engine at batch {eng['batch']}: on this CPU a batch costs about its size "
            "times one image, so batching buys little throughput and mainly adds waiting."
            if single["in_server_images_per_inference_s"] >= 0.9 * raw else
            f"**Batching.** At 1 connection (batches of {single['mean_batch']:.1f}) the model ran "
            f"{single['in_server_images_per_inference_s']:.1f} images per second of inference, against "
            f"{raw:.1f} for the raw engine at batch {eng['batch']}: batching pays off on this hardware."
        )
    sat = summary.get("at_1000")
    if sat is not None:
        late = max(0, sat["images_inferred"] - sat["ok"])
        expired = max(0, sat["status_504"] - late)
        text = (
            f"**{SATURATED_CONNECTIONS} connections.** With a queue capacity of 1024 and "
            f"{SATURATED_CONNECTIONS} connections each holding at most one request, the queue cannot "
            "overflow, so no 429 is expected; with one request per connection in flight, a request waits "
            f"about {SATURATED_CONNECTIONS} / throughput seconds ({SATURATED_CONNECTIONS / best['ok_per_s']:.1f} s "
            f"at the best rate of {best['ok_per_s']:.0f} req/s), past the 2000 ms default deadline. "
            f"Measured: {sat['ok']:,} answered 200 ({sat['ok_per_s']:.1f}/s), {sat['status_504']:,} 504. "
        )
        if sat["status_504"]:
            text += (
                f"Of the 504s, about {late:,} had already been inferred when their deadline passed (the model "
                f"ran {sat['images_inferred']:,} images but only {sat['ok']:,} answers were 200), and about "
                f"{expired:,} expired in the queue and were dropped by the batcher before running, having "
                "spent only their preprocessing. "
            )
        text += (
            f"Throughput of 200s fell to {sat['ok_per_s'] / best['ok_per_s']:.0%} of the best level: "
            f"the session thread was still busy {sat['session_busy']:.0%} of the time, but a batch took "
            f"{sat['ms_per_batch_mean']:.0f} ms instead of {best['ms_per_batch_mean'] / best['mean_batch'] * sat['mean_batch']:.0f} "
            f"ms, because about {sat['preprocess_cores_est']:.2f} of the {nproc} CPUs went to decoding "
            f"the images of {sat['responses_per_s']:.0f} requests per second, most of which were then refused "
            "or expired. "
        )
        if sat["status_429"]:
            text += (
                f"Yet {sat['status_429']:,} requests got 429 (queue full) although fewer connections than "
                "queue slots were open: a request that times out is answered 504 at once, but its job keeps "
                "its slot until the session thread next takes jobs from the queue, which it only does between "
                f"batches ({sat['ms_per_batch_mean']:.0f} ms each here). The client sends its next request on "
                "the same connection immediately, so live and abandoned jobs together exceed the capacity. A "
                "429 is decided after the image has been decoded and normalised, so each one also costs a "
                "full preprocessing. "
            )
        out.append(text)
    stale = [lv for lv in levels if (lv["queue_depth_gauge_when_idle"] or 0) > 0]
    if stale:
        worst = max(stale, key=lambda lv: lv["queue_depth_gauge_when_idle"])
        out.append(
            f"**Queue-depth gauge.** After the {worst['concurrency']}-connection level, with every request "
            f"answered and no batch running, `inferpool_queue_depth` still read "
            f"{worst['queue_depth_gauge_when_idle']:.0f}: the gauge is only written when a request is queued "
            "or a batch is taken, not when the session thread discards abandoned or expired jobs and then "
            "waits, so it keeps the last value. Dashboards and autoscaling that read it see a queue that is "
            "not there."
        )
    warn_lines = results["meta"].get("sidecar_warn_request_failed")
    total_5xx = sum(lv["status_504"] for lv in levels)
    if warn_lines:
        out.append(
            f"**Logging under overload.** The sidecar wrote {warn_lines:,} `WARN request failed` lines during "
            f"the run ({total_5xx:,} responses were 504): one line for every request past its deadline, at "
            "the moment the server is most loaded."
        )
    overflow = [lv for lv in levels if lv["tcp_counters"].get("TcpExt.ListenOverflows")]
    backlog = results["meta"].get("listen_backlog")
    for lv in overflow:
        conn = lv["connect_ms"]
        out.append(
            f"**Accept queue at {lv['concurrency']} connections.** The kernel counted "
            f"{lv['tcp_counters']['TcpExt.ListenOverflows']:,} accept-queue overflows while "
            f"{lv['concurrency']} clients connected at once, and connecting took "
            f"{fmt(conn.get('average'), 0)} ms on average and up to {fmt(conn.get('slowest'), 0)} ms "
            "(a dropped handshake is retried after a second or more). "
            + (f"The sidecar's public socket listened with a backlog of {backlog} (`ss -ltn`), and its "
               "accept loop competes for the CPUs with preprocessing and inference; a backlog of at least "
               "the expected burst of connections would absorb it."
               if backlog else "")
        )
    errs = [lv for lv in levels if lv["transport_errors"]]
    for lv in errs:
        net = lv["tcp_counters"]
        counters = ", ".join(f"{k.split('.')[1]} +{net[k]}" for k in NET_COUNTERS if net.get(k))
        out.append(
            f"**Transport errors at {lv['concurrency']} connections.** oha saw {lv['transport_errors']:,} "
            f"({', '.join(f'{k}: {v}' for k, v in lv['error_distribution'].items())}). Kernel counters over "
            f"the level: {counters or 'none moved'}."
        )
    return out


def run_args(doc: str, script: str) -> tuple[Path, Path, dict]:
    """Command line of a report: (run directory, output directory, the run's meta.json + load averages)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("run", type=Path, help=f"run directory written by {script}")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = ap.parse_args()
    run = args.run
    meta = json.loads((run / "meta.json").read_text())
    meta["loadavg_start"] = " ".join((run / "loadavg-start").read_text().split()[:3])
    end = run / "loadavg-end"
    meta["loadavg_end"] = " ".join(end.read_text().split()[:3]) if end.exists() else "?"
    return run, args.out, meta


def main() -> None:
    run, out, meta = run_args(__doc__, "scripts/bench-sidecar.sh")
    log = run / "sidecar.log"
    if log.exists():
        meta["sidecar_warn_request_failed"] = sum(
            1 for line in log.read_text(errors="replace").splitlines() if "WARN" in line and "request failed" in line
        )
    listen = run / "listen-socket"
    if listen.exists() and len(listen.read_text().split()) >= 3:
        # `ss -Hltn` prints State Recv-Q Send-Q ...; for a listening socket Send-Q is the backlog.
        meta["listen_backlog"] = int(listen.read_text().split()[2])
    engine = json.loads((run / "engine.json").read_text())
    levels = [level_result(run, c, engine) for c in meta["levels"]
              if (run / f"level-{c}.oha.json").exists()]
    if not levels:
        raise SystemExit(f"{run}: no level results")
    raw = engine["images_per_s"]
    best = max(levels, key=lambda lv: lv["ok_per_s"] or 0.0)
    at_1000 = next((lv for lv in levels if lv["concurrency"] == SATURATED_CONNECTIONS), None)
    saturation_met = None
    if at_1000 is not None:
        saturation_met = (at_1000["transport_errors"] == 0 and not at_1000["other_status"]
                          and at_1000["requests"] == at_1000["ok"] + at_1000["status_429"] + at_1000["status_504"])
    summary = {
        "http_ok_per_s": best["ok_per_s"],
        "saturation_level": best["concurrency"],
        "raw_images_per_s": raw,
        "ratio": best["ok_per_s"] / raw,
        "ratio_target": TARGET_RATIO,
        "ratio_met": best["ok_per_s"] / raw >= TARGET_RATIO,
        "at_1000": at_1000,
        "saturation_met": saturation_met,
    }
    results = {"meta": meta, "machine": machine(), "engine": engine, "levels": levels, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sidecar-results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "sidecar.svg").write_text(svg_plot(levels, raw))
    (out / "sidecar.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
