#!/usr/bin/env python3
"""Turns one run of scripts/bench-pipeline.sh into docs/benchmarks/pipeline.{md,svg} and
pipeline-results.json. Standard library only; the plot is written as SVG by hand.

    .cache/venv/bin/python scripts/bench_pipeline_report.py .cache/bench/pipeline-XXXX --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SIZES = ["640x400", "1920x1080", "4032x3024"]
MODELS = ["default", "near-zero"]
MODES = ["reduced", "full"]
DECODERS = ["image-full", "turbo-reduced", "turbo-full", "jpeg-decoder-scaled"]
# The decoder each --jpeg-decode mode uses for a JPEG, for the decode limit the HTTP path is held to.
MODE_DECODER = {"reduced": "turbo-reduced", "full": "image-full"}
TARGET_12MP = 3.5
TARGET_DECODE_LIMIT = 0.85
TARGET_GOODPUT = 0.9
TARGET_REFUSAL_P99_MS = 10.0
TARGET_RSS_GROWTH_MB = 300.0


def load(run: Path) -> dict:
    meta = json.loads((run / "meta.json").read_text())
    decode = json.loads((run / "decode.json").read_text())
    limit = {}
    for r in decode["results"]:
        size = f'{r["width"]}x{r["height"]}'
        limit[(size, r["decoder"])] = r
    build = []
    if (run / "build-cost.jsonl").exists():
        build = [json.loads(line) for line in (run / "build-cost.jsonl").read_text().splitlines() if line]
    http = {}
    for model in MODELS:
        for mode in MODES:
            for size in SIZES:
                for c in meta["levels"]:
                    path = run / f"http-{model}-{mode}-{size}-c{c}.json"
                    if path.exists():
                        http[(model, mode, size, c)] = json.loads(path.read_text())
    overload = json.loads((run / "overload.json").read_text())
    overload_meta = json.loads((run / "overload-meta.json").read_text())
    return {"meta": meta, "limit": limit, "build": build, "http": http, "overload": overload,
            "overload_meta": overload_meta}


def ok_rate(r: dict) -> float:
    return r["by_status"].get("200", {}).get("per_second", 0.0)


def best(data: dict, model: str, mode: str, size: str) -> tuple[float, int]:
    rates = [(ok_rate(r), c) for (m, md, s, c), r in data["http"].items() if (m, md, s) == (model, mode, size)]
    return max(rates) if rates else (0.0, 0)


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def svg(data: dict) -> str:
    levels = data["meta"]["levels"]
    pw, ph, pad = 300, 220, 50
    width, height = pad + 3 * (pw + pad), ph + 2 * pad + 50
    colors = {("default", "reduced"): "#1f77b4", ("default", "full"): "#9ecae1",
              ("near-zero", "reduced"): "#d62728", ("near-zero", "full"): "#fc9272"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">Embed requests/s (200s) by concurrency; dashed: decode limit (reduced, full)</text>']
    for i, size in enumerate(SIZES):
        x0, y0 = pad + i * (pw + pad), pad
        series = {(m, md): [ok_rate(data["http"].get((m, md, size, c), {"by_status": {}})) for c in levels]
                  for m in MODELS for md in MODES}
        limits = [data["limit"].get((size, MODE_DECODER[md]), {}).get("images_per_second", 0.0) for md in MODES]
        top = max([v for s in series.values() for v in s] + limits + [1.0]) * 1.1
        out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        out.append(f'<text x="{x0 + pw / 2}" y="{y0 - 8}" text-anchor="middle">{size}</text>')
        for k in range(5):
            v = top * k / 4
            y = y0 + ph - ph * k / 4
            out.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{v:.0f}</text>')
        xs = [x0 + pw * (j + 0.5) / len(levels) for j in range(len(levels))]
        for j, c in enumerate(levels):
            out.append(f'<text x="{xs[j]}" y="{y0 + ph + 14}" text-anchor="middle">{c}</text>')
        out.append(f'<text x="{x0 + pw / 2}" y="{y0 + ph + 26}" text-anchor="middle" fill="#555">concurrency</text>')
        for md, lim in zip(MODES, limits):
            y = y0 + ph - ph * lim / top
            color = colors[("near-zero", md)]
            out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" stroke-dasharray="4 3"/>')
        for key, vals in series.items():
            pts = " ".join(f"{xs[j]:.1f},{y0 + ph - ph * v / top:.1f}" for j, v in enumerate(vals))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colors[key]}" stroke-width="2"/>')
    ly = pad + ph + 44
    for k, ((m, md), color) in enumerate(colors.items()):
        lx = pad + k * 250
        out.append(f'<line x1="{lx}" x2="{lx + 20}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{lx + 26}" y="{ly + 4}">{m} model, {md} decoding</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def report(data: dict, run: Path) -> tuple[str, dict]:
    meta, limit, o, om = data["meta"], data["limit"], data["overload"], data["overload_meta"]
    lines = ["# Request pipeline benchmark", "",
             f"`make bench-pipeline` ({meta['started_utc']}, commit {meta['git_commit']}), one run on one machine: "
             f"{meta['cpu']}, {meta['nproc']} CPUs, {meta['memory_gib']} GiB, no GPU. {meta['rustc']}. "
             f"Raw files: `{run}`. All numbers are from this one run; ratios compare numbers of the same run.", ""]
    lines += ["## 1. Decode limit (decode + resize to 224x224, no HTTP, every core)", "",
              "| photo | bytes | " + " | ".join(DECODERS) + " |", "|---|---|" + "---|" * len(DECODERS)]
    for size in SIZES:
        base = limit.get((size, "image-full"), {}).get("images_per_second", 0.0) or 1.0
        cells = []
        for d in DECODERS:
            r = limit.get((size, d), {})
            cells.append(f'{r.get("images_per_second", 0):.0f}/s ({r.get("images_per_second", 0) / base:.2f}x), '
                         f'diff {r.get("mean_abs_diff_vs_image_full", 0):.2f} / {r.get("max_abs_diff_vs_image_full", 0):.0f}')
        nbytes = limit.get((size, "image-full"), {}).get("bytes", 0)
        lines.append(f"| {size} | {nbytes} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: images/s on all cores (ratio to `image-full`, the decoder before reduced decoding), then the "
              "mean / largest absolute difference of the 224x224 RGB result from `image-full`'s (0-255).", ""]
    if data["build"]:
        lines += ["Build cost after `cargo clean --release -p CRATE` (everything else already built; jpeg-decoder "
                  "is timed through the example that uses it, relinking included): " +
                  ", ".join(f'{b["crate"]} {b["seconds"]:.0f} s' for b in data["build"]) + ".", ""]
    lines += ["## 2. HTTP (`POST /api/v1/embed`, cache off), answers 200 per second", "",
              "Closed loop: each of c clients sends its next request when the last is answered, and after a 429 "
              "waits its Retry-After (plus 0-50% jitter), as docs/sidecar.md asks clients to. The load generator "
              "runs on the same CPUs as the sidecar.", "",
              "| model | decode | photo | " + " | ".join(f"c={c}" for c in meta["levels"]) + " | decode limit |",
              "|---|---|---|" + "---|" * (len(meta["levels"]) + 1)]
    for model in MODELS:
        for mode in MODES:
            for size in SIZES:
                cells = [f'{ok_rate(data["http"][(model, mode, size, c)]):.1f}' if (model, mode, size, c) in data["http"] else "-"
                         for c in meta["levels"]]
                lim = limit.get((size, MODE_DECODER[mode]), {}).get("images_per_second", 0.0)
                lines.append(f"| {model} | {mode} | {size} | " + " | ".join(cells) + f" | {lim:.0f} |")
    lines += ["", "![requests per second](pipeline.svg)", ""]

    results = {"meta": meta, "targets": {}}
    red12, _ = best(data, "default", "reduced", "4032x3024")
    full12, _ = best(data, "default", "full", "4032x3024")
    ratio12 = red12 / full12 if full12 else 0.0
    results["targets"]["default_12mp_reduced_over_full"] = {"value": ratio12, "target": TARGET_12MP, "met": ratio12 >= TARGET_12MP}
    lines += ["## Targets", "", "| target | measured | |", "|---|---|---|",
              f"| 12 MP, default model: reduced >= {TARGET_12MP}x full-decode req/s | {red12:.1f} / {full12:.1f} = {ratio12:.2f}x | {met(ratio12 >= TARGET_12MP)} |"]
    for size in SIZES:
        got, c = best(data, "near-zero", "reduced", size)
        lim = limit.get((size, "turbo-reduced"), {}).get("images_per_second", 0.0)
        ratio = got / lim if lim else 0.0
        results["targets"][f"near_zero_{size}_over_decode_limit"] = {"value": ratio, "target": TARGET_DECODE_LIMIT, "met": ratio >= TARGET_DECODE_LIMIT}
        run = data["http"].get(("near-zero", "reduced", size, c), {})
        share = (run.get("client_cpu_seconds") or 0) / (run.get("seconds", 1) * meta["nproc"])
        lines.append(f"| near-zero model, {size}: HTTP >= {TARGET_DECODE_LIMIT}x the decode limit | {got:.0f} (c={c}) / {lim:.0f} = "
                     f"{ratio:.2f}x; the load generator used {share:.0%} of the machine's CPU | {met(ratio >= TARGET_DECODE_LIMIT)} |")
    statuses = o["by_status"]
    goodput = statuses.get("200", {}).get("per_second", 0.0)
    sat = om["saturated_per_second"]
    gp = goodput / sat if sat else 0.0
    p99_429 = statuses.get("429", {}).get("p99_ms")
    growth_mb = (om["rss_peak_bytes"] - om["rss_before_bytes"]) / 2**20
    results["targets"]["overload_goodput"] = {"value": gp, "target": TARGET_GOODPUT, "met": gp >= TARGET_GOODPUT}
    results["targets"]["overload_429_p99_ms"] = {"value": p99_429, "target": TARGET_REFUSAL_P99_MS,
                                                 "met": p99_429 is not None and p99_429 < TARGET_REFUSAL_P99_MS}
    results["targets"]["overload_rss_growth_mb"] = {"value": growth_mb, "target": TARGET_RSS_GROWTH_MB, "met": growth_mb <= TARGET_RSS_GROWTH_MB}
    p99_text = f"{p99_429:.1f} ms" if p99_429 is not None else "no 429s"
    lines += [f"| overload: goodput >= {TARGET_GOODPUT} of saturated | {goodput:.1f} / {sat:.1f} = {gp:.2f} | {met(gp >= TARGET_GOODPUT)} |",
              f"| overload: p99 of the 429s < {TARGET_REFUSAL_P99_MS:.0f} ms | {p99_text} | {met(p99_429 is not None and p99_429 < TARGET_REFUSAL_P99_MS)} |",
              f"| overload: peak RSS growth <= {TARGET_RSS_GROWTH_MB:.0f} MB | {growth_mb:.0f} MB | {met(growth_mb <= TARGET_RSS_GROWTH_MB)} |", ""]
    lines += ["## 3. Overload", "",
              f"{om['rate']}/s of the 12 MP photo ({meta['overload_factor']}x the saturated {sat:.1f}/s of 200s, the best "
              f"level of the default model with reduced decoding above) for {meta['overload_seconds']} s, open loop "
              f"(sent whatever the answers), default deadline 2 s.", "",
              "| status | answers | per second | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    for status, s in sorted(statuses.items()):
        lines.append(f"| {status} | {s['count']} | {s['per_second']:.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['max_ms']:.1f} |")
    lines += ["", f"Sends skipped at the in-flight cap: {o['skipped']}. RSS before: {om['rss_before_bytes'] / 2**20:.0f} MB, "
              f"peak during: {om['rss_peak_bytes'] / 2**20:.0f} MB.", ""]
    results["decode"] = [limit[k] for k in sorted(limit)]
    results["http"] = [{"model": k[0], "mode": k[1], "photo": k[2], "concurrency": k[3], **v} for k, v in sorted(data["http"].items())]
    results["overload"] = {**om, **o}
    return "\n".join(lines), results


def main() -> None:
    ap = argparse.ArgumentParser(description="pipeline benchmark report")
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    data = load(args.run)
    md, results = report(data, args.run)
    notes = args.out / "pipeline-notes.md"
    if notes.exists():
        md += "\n" + notes.read_text()
    (args.out / "pipeline.md").write_text(md + "\n")
    (args.out / "pipeline.svg").write_text(svg(data))
    (args.out / "pipeline-results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
