#!/usr/bin/env python3
"""Soak test: mixed traffic for an hour against one release sidecar with a real Redis.

Starts redis-server and target/release/inferpool-sidecar on free loopback ports, then sends, at a
steady rate, a mix of cache hits, cache misses (a new image each), matches, scans, bad inputs of
ten kinds, reads of reports and health, profile writes and deletes (one client, so the expected
answer of each is known), and a tuning push every 30 s. Every request has one expected status;
429/503/504 on image requests are load shedding by design and counted apart; anything else is
unexpected. The sidecar's RSS is sampled every 10 s.

Writes the raw samples to .cache/bench/soak-<time>/ and the report to docs/benchmarks/soak.md,
soak.svg and soak-results.json. Targets: RSS growth after warm-up <= 50 MB, 0 unexpected statuses.
Only 127.0.0.1 is contacted. Standard library plus Pillow (for the images); the plot is SVG by hand.

    make soak                                   # SOAK_SECONDS=3600, SOAK_RATE=20 requests/s
    .cache/venv/bin/python scripts/soak.py --seconds 300 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "soak-admin-token"
SHED = {429, 503, 504}
GROWTH_TARGET_MB = 50.0


def log(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --- inputs -------------------------------------------------------------------------------------


def photo() -> Image.Image:
    import skimage  # the venv's scikit-image ships real photos

    return Image.open(Path(skimage.__file__).parent / "data" / "chelsea.png").convert("RGB").resize((224, 224))


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, quality=90) if fmt == "JPEG" else img.save(out, format=fmt)
    return out.getvalue()


def variant(base: Image.Image, n: int) -> bytes:
    """A PNG that differs from every other variant in pixel (0, 0): its own cache key."""
    img = base.copy()
    img.putpixel((0, 0), (n & 255, (n >> 8) & 255, (n >> 16) & 255))
    return encode(img)


@dataclass
class Request:
    kind: str
    method: str
    path: str
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    expect: int = 200
    admin: bool = False


def bad_inputs(jpeg: bytes) -> list[Request]:
    img = {"content-type": "image/jpeg"}
    return [
        Request("bad: empty body", "POST", "/api/v1/embed", b"", img, 400),
        Request("bad: truncated JPEG", "POST", "/api/v1/embed", jpeg[: len(jpeg) // 2], img, 422),
        Request("bad: not an image", "POST", "/api/v1/embed", b"hello, not an image", img, 415),
        Request("bad: Content-Type", "POST", "/api/v1/embed", jpeg, {"content-type": "application/json"}, 415),
        Request("bad: X-Priority", "POST", "/api/v1/embed", jpeg, {**img, "x-priority": "urgent"}, 400),
        Request("bad: unknown parameter", "POST", "/api/v1/embed?topk=3", jpeg, img, 400),
        Request("bad: top_k 0", "POST", "/api/v1/scan?top_k=0", jpeg, img, 400),
        Request("bad: unknown profile", "POST", "/api/v1/match?profile=nobody", jpeg, img, 404),
        Request("bad: profile JSON", "PUT", "/api/v1/profiles/x", b'{"references": [', {"content-type": "application/json"}, 400),
        Request("bad: unknown route", "GET", "/api/v2/embed", b"", {}, 404),
        Request("bad: tuning token", "PUT", "/api/v1/tuning", b"{}", {"authorization": "Bearer wrong"}, 401, admin=True),
    ]


# --- the run ------------------------------------------------------------------------------------


class Tally:
    """Counts per request kind and status, latencies, and the first unexpected answers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_kind: dict[str, dict[int, int]] = {}
        self.latency: dict[str, list[float]] = {}
        self.unexpected: list[str] = []
        self.unexpected_count = 0
        self.shed = 0
        self.total = 0

    def record(self, req: Request, status: int, seconds: float, body: bytes) -> None:
        with self.lock:
            self.total += 1
            counts = self.by_kind.setdefault(req.kind, {})
            counts[status] = counts.get(status, 0) + 1
            self.latency.setdefault(req.kind, []).append(seconds)
            if status == req.expect:
                return
            if status in SHED and req.expect == 200 and req.method == "POST":
                self.shed += 1
                return
            self.unexpected_count += 1
            if len(self.unexpected) < 20:
                self.unexpected.append(f"{req.kind}: {req.method} {req.path} -> {status} {body[:200]!r}")


class Client:
    """One keep-alive connection per listener; reconnects after a broken one (which is counted)."""

    def __init__(self, api: int, admin: int) -> None:
        self.ports = {False: api, True: admin}
        self.conns: dict[bool, HTTPConnection] = {}

    def send(self, req: Request) -> tuple[int, bytes]:
        for attempt in (1, 2):
            conn = self.conns.get(req.admin) or HTTPConnection("127.0.0.1", self.ports[req.admin], timeout=60)
            self.conns[req.admin] = conn
            try:
                conn.request(req.method, req.path, body=req.body, headers=req.headers)
                resp = conn.getresponse()
                body = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    self.conns.pop(req.admin, None)
                return resp.status, body
            except (OSError, HTTPException) as e:
                conn.close()
                self.conns.pop(req.admin, None)
                # A keep-alive connection the server closed between requests is retried once;
                # a second failure is an answer of its own (status 0: unexpected).
                if attempt == 2:
                    return 0, repr(e).encode()
        return 0, b""


def traffic_worker(n: int, rate: float, stop: threading.Event, tally: Tally, ctx: dict) -> None:
    rng = random.Random(n)
    client = Client(ctx["api"], ctx["admin"])
    interval = 1.0 / rate
    next_at = time.monotonic() + rng.random() * interval
    img = {"content-type": "image/png"}
    while not stop.is_set():
        now = time.monotonic()
        if next_at > now:
            stop.wait(next_at - now)
            continue
        next_at += interval
        roll = rng.random()
        if roll < 0.40:
            req = Request("embed hit", "POST", "/api/v1/embed", rng.choice(ctx["hot"]), img)
        elif roll < 0.60:
            with ctx["lock"]:
                ctx["next_variant"] += 1
                k = ctx["next_variant"]
            req = Request("embed miss", "POST", "/api/v1/embed", variant(ctx["base"], k), img)
        elif roll < 0.70:
            req = Request("match", "POST", "/api/v1/match?profile=soak-hot", rng.choice(ctx["hot"]), img)
        elif roll < 0.75:
            req = Request("scan", "POST", "/api/v1/scan?top_k=3", rng.choice(ctx["hot"]), img)
        elif roll < 0.88:
            req = rng.choice(ctx["bad"])
        else:
            path = rng.choice(["/api/v1/health", "/api/v1/metrics/sla", "/metrics", "/api/v1/profiles/soak-hot?include=embeddings"])
            req = Request("read: " + path.split("?")[0], "GET", path)
        started = time.monotonic()
        status, body = client.send(req)
        tally.record(req, status, time.monotonic() - started, body)


def profile_worker(stop: threading.Event, tally: Tally, ctx: dict) -> None:
    """Writes and deletes profiles soak-0..soak-19 every 2 s, knowing which exist."""
    rng = random.Random(99)
    client = Client(ctx["api"], ctx["admin"])
    existing: set[str] = set()
    dim = ctx["dim"]
    while not stop.wait(2.0):
        pid = f"soak-{rng.randrange(20)}"
        if pid in existing and rng.random() < 0.3:
            req = Request("profile delete", "DELETE", f"/api/v1/profiles/{pid}")
            existing.discard(pid)
        else:
            if rng.random() < 0.5:
                refs = [{"id": f"r{i}", "embedding": [rng.gauss(0, 1) for _ in range(dim)]} for i in range(3)]
            else:
                refs = [{"id": "img", "image_b64": base64.b64encode(rng.choice(ctx["hot"])).decode()}]
            body = json.dumps({"threshold": 0.6, "references": refs}).encode()
            req = Request("profile write", "PUT", f"/api/v1/profiles/{pid}", body, {"content-type": "application/json"})
            req.expect = 200 if pid in existing else 201
            existing.add(pid)
        started = time.monotonic()
        status, body = client.send(req)
        tally.record(req, status, time.monotonic() - started, body)


def tuning_worker(stop: threading.Event, tally: Tally, ctx: dict) -> None:
    """A tuning push every 30 s, as the operator sends them, alternating two settings."""
    client = Client(ctx["api"], ctx["admin"])
    generation = 0
    while not stop.wait(30.0):
        generation += 1
        small = generation % 2 == 0
        tuning = {"generation": generation, "maxBatchSize": 8 if small else 16, "maxDelayMs": 5 if small else 10,
                  "cacheEntries": 500 if small else 1000}
        headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
        req = Request("tuning push", "PUT", "/api/v1/tuning", json.dumps(tuning).encode(), headers, 200, admin=True)
        started = time.monotonic()
        status, body = client.send(req)
        tally.record(req, status, time.monotonic() - started, body)


def start_redis(run_dir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, port
    raise SystemExit("soak: redis-server did not start")


def start_sidecar(binary: Path, run_dir: Path, redis_port: int) -> tuple[subprocess.Popen, int, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERPOOL_")}
    env.update({
        "INFERPOOL_MODEL": str(ROOT / "models/effnet_lite0/card.json"),
        "INFERPOOL_DATA_DIR": str(run_dir / "data"),
        "INFERPOOL_LISTEN": "127.0.0.1:0",
        "INFERPOOL_ADMIN_LISTEN": "127.0.0.1:0",
        "INFERPOOL_ADMIN_TOKEN": TOKEN,
        "INFERPOOL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "INFERPOOL_LOG_FORMAT": "json",
        "INFERPOOL_LOG": "info,ort=warn",
    })
    logfile = open(run_dir / "sidecar.log", "w")
    proc = subprocess.Popen([str(binary)], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    ports = None
    for line in proc.stderr:
        logfile.write(line)
        try:
            fields = json.loads(line).get("fields", {})
        except json.JSONDecodeError:
            continue
        msg = fields.get("message", "")
        if msg.startswith("listening"):
            ports = int(fields["api"].rsplit(":", 1)[1]), int(fields["admin"].rsplit(":", 1)[1])
        if msg.startswith("ready") and ports:
            break
    else:
        raise SystemExit(f"soak: the sidecar exited before it was ready; see {run_dir / 'sidecar.log'}")

    def drain() -> None:
        for rest in proc.stderr:
            logfile.write(rest)
        logfile.close()

    threading.Thread(target=drain, daemon=True).start()
    return proc, ports[0], ports[1]


def health(api: int) -> dict:
    conn = HTTPConnection("127.0.0.1", api, timeout=10)
    conn.request("GET", "/api/v1/health")
    return json.loads(conn.getresponse().read())


def run(args: argparse.Namespace) -> dict:
    run_dir = ROOT / ".cache/bench" / time.strftime("soak-%Y%m%dT%H%M%SZ", time.gmtime())
    (run_dir / "data").mkdir(parents=True)
    log(f"raw results go to {run_dir}")
    redis, redis_port = start_redis(run_dir)
    sidecar, api, admin = start_sidecar(args.sidecar, run_dir, redis_port)
    log(f"sidecar pid {sidecar.pid} on 127.0.0.1:{api} (admin {admin}), redis on {redis_port}")
    base = photo()
    hot = [variant(base, 1 << 23 | i) for i in range(16)]
    ctx = {"api": api, "admin": admin, "base": base, "hot": hot, "lock": threading.Lock(), "next_variant": 0,
           "bad": bad_inputs(encode(base, "JPEG"))}
    setup = Client(api, admin)
    status, body = setup.send(Request("setup", "POST", "/api/v1/embed", hot[0], {"content-type": "image/png"}))
    assert status == 200, body
    ctx["dim"] = json.loads(body)["dim"]
    refs = [{"id": f"hot{i}", "image_b64": base64.b64encode(h).decode()} for i, h in enumerate(hot[:4])]
    status, body = setup.send(Request("setup", "PUT", "/api/v1/profiles/soak-hot", json.dumps({"references": refs}).encode(),
                                      {"content-type": "application/json"}))
    assert status == 201, body

    tally, stop = Tally(), threading.Event()
    workers = [threading.Thread(target=traffic_worker, args=(n, args.rate / args.clients, stop, tally, ctx))
               for n in range(args.clients)]
    workers += [threading.Thread(target=profile_worker, args=(stop, tally, ctx)),
                threading.Thread(target=tuning_worker, args=(stop, tally, ctx))]
    started = time.monotonic()
    for w in workers:
        w.start()
    samples = []
    try:
        while True:
            t = time.monotonic() - started
            h = health(api)
            samples.append({
                "t": round(t, 1), "rss": rss_bytes(sidecar.pid), "requests": tally.total,
                "unexpected": tally.unexpected_count, "shed": tally.shed,
                "memory_entries": h["components"]["memoryCache"]["entries"],
                "disk_entries": h["components"]["diskCache"].get("entries"),
                "health": h["status"],
            })
            if len(samples) % 6 == 1:
                log(f"{t / 60:5.1f} of {args.seconds / 60:.0f} min: {tally.total:,} requests, RSS "
                    f"{samples[-1]['rss'] / 2**20:.1f} MiB, {tally.unexpected_count} unexpected, {tally.shed} shed")
            if t >= args.seconds:
                break
            time.sleep(min(args.sample_seconds, max(0.0, args.seconds - t)))
    finally:
        stop.set()
        for w in workers:
            w.join()
        sidecar.send_signal(signal.SIGTERM)
        exit_code = sidecar.wait(timeout=60)
        redis.terminate()
        redis.wait(timeout=10)
    raw = {"samples": samples, "by_kind": tally.by_kind, "unexpected": tally.unexpected, "exit_code": exit_code,
           "latency": {k: summary(v) for k, v in tally.latency.items()}, "seconds": args.seconds, "rate": args.rate,
           "warmup_seconds": args.warmup, "run_dir": str(run_dir.relative_to(ROOT)), "machine": machine()}
    (run_dir / "raw.json").write_text(json.dumps(raw, indent=1))
    return raw


def summary(values: list[float]) -> dict:
    v = sorted(values)
    pick = lambda q: round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 1)  # noqa: E731
    return {"n": len(v), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": round(v[-1] * 1000, 1)}


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown")
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem, 1)}


# --- the report ---------------------------------------------------------------------------------


def results(raw: dict) -> dict:
    samples = raw["samples"]
    after = [s for s in samples if s["t"] >= raw["warmup_seconds"]] or samples[-1:]
    at_warmup = after[0]["rss"]
    growth = (max(s["rss"] for s in after) - at_warmup) / 1e6
    end_growth = (samples[-1]["rss"] - at_warmup) / 1e6
    unexpected = samples[-1]["unexpected"]
    return {
        "rss_at_warmup_mib": round(at_warmup / 2**20, 1),
        "rss_end_mib": round(samples[-1]["rss"] / 2**20, 1),
        "rss_max_mib": round(max(s["rss"] for s in samples) / 2**20, 1),
        "growth_after_warmup_mb": round(growth, 1),
        "growth_end_mb": round(end_growth, 1),
        "requests": samples[-1]["requests"],
        "unexpected": unexpected,
        "shed": samples[-1]["shed"],
        "targets": {
            "rss_growth": {"target": f"<= {GROWTH_TARGET_MB:g} MB", "value": round(growth, 1), "met": growth <= GROWTH_TARGET_MB},
            "unexpected_statuses": {"target": "0", "value": unexpected, "met": unexpected == 0 and raw["exit_code"] == 0},
        },
    }


def svg(raw: dict) -> str:
    samples = raw["samples"]
    w, h, left, top, plot_w, plot_h = 760, 320, 70, 30, 660, 230
    t_max = max(samples[-1]["t"], 1.0)
    mib = [s["rss"] / 2**20 for s in samples]
    y_max = max(50.0, max(mib) * 1.15)
    x = lambda t: left + plot_w * t / t_max  # noqa: E731
    y = lambda v: top + plot_h * (1 - v / y_max)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="13">Sidecar RSS during the soak ({raw["rate"]:g} requests/s of mixed traffic)</text>']
    for i in range(6):
        v = y_max * i / 5
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f} MiB</text>')
    for i in range(7):
        t = t_max * i / 6
        out.append(f'<text x="{x(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{t / 60:.0f} min</text>')
    warm = x(min(raw["warmup_seconds"], t_max))
    out.append(f'<rect x="{left}" y="{top}" width="{warm - left:.1f}" height="{plot_h}" fill="#f4f4f4"/>')
    out.append(f'<text x="{left + 4}" y="{top + 14}" fill="#888">warm-up</text>')
    points = " ".join(f"{x(s['t']):.1f},{y(v):.1f}" for s, v in zip(samples, mib))
    out.append(f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#444"/>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#444"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def markdown(raw: dict, res: dict) -> str:
    m = raw["machine"]
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    t = res["targets"]
    lines = [
        "# Soak",
        "",
        f"`make soak` (scripts/soak.py): {raw['seconds'] / 60:.0f} minutes of mixed traffic at {raw['rate']:g} "
        f"requests/s against one release sidecar with a real Redis, on this machine ({m['cpus']} CPUs, {m['cpu']}, "
        f"{m['memory_gib']} GiB). Raw samples: `{raw['run_dir']}/raw.json` (not committed); results: "
        "[soak-results.json](soak-results.json); plot: [soak.svg](soak.svg).",
        "",
        "Traffic: 40% cache hits (16 hot images), 20% misses (a new image each, so every tier grows),",
        "10% matches, 5% scans, 13% bad inputs of eleven kinds (each with its one expected status), 12%",
        "reads of health, reports, metrics and a profile; one client writes and deletes 20 profiles every",
        "2 s; a tuning push every 30 s alternates batch size, delay and memory-cache capacity.",
        "",
        "| target | result | status |",
        "|---|---|---|",
        f"| RSS growth after the {raw['warmup_seconds'] / 60:.0f}-minute warm-up | {t['rss_growth']['value']} MB "
        f"(largest sample after warm-up minus the sample at the end of warm-up; {res['growth_end_mb']} MB at the end) | "
        f"{met(t['rss_growth']['met'])} (target <= {GROWTH_TARGET_MB:g} MB) |",
        f"| unexpected statuses | {res['unexpected']} of {res['requests']:,} requests; exit code {raw['exit_code']} "
        f"after SIGTERM | {met(t['unexpected_statuses']['met'])} (target 0) |",
        "",
        f"RSS: {res['rss_at_warmup_mib']} MiB at the end of warm-up, {res['rss_max_mib']} MiB at most, "
        f"{res['rss_end_mib']} MiB at the end. Load shed by design (429/503/504 on image requests): {res['shed']}.",
        "",
        "![RSS over the soak](soak.svg)",
        "",
        "| request | answers by status | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for kind in sorted(raw["by_kind"]):
        counts = ", ".join(f"{s}: {n:,}" for s, n in sorted(raw["by_kind"][kind].items(), key=lambda kv: int(kv[0])))
        lat = raw["latency"][kind]
        lines.append(f"| {kind} | {counts} | {lat['p50_ms']} | {lat['p99_ms']} | {lat['max_ms']} |")
    if raw["unexpected"]:
        lines += ["", "First unexpected answers:", ""] + [f"- `{u}`" for u in raw["unexpected"]]
    lines += ["", "The memory tier is bounded by its capacity (tuned between 500 and 1,000 entries), the disk tier",
              "by its budget, Redis entries by their TTL; profile writes replace 20 ids. Growth after warm-up",
              "would mean one of these bounds leaks.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 3600)))
    p.add_argument("--rate", type=float, default=float(os.environ.get("SOAK_RATE", 20)), help="requests/s, all clients")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--warmup", type=float, default=None, help="seconds (default: 10%% of the run, at most 300)")
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--sidecar", type=Path, default=ROOT / "target/release/inferpool-sidecar")
    p.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks")
    args = p.parse_args()
    if args.warmup is None:
        args.warmup = min(300.0, args.seconds / 10)
    if not args.sidecar.exists():
        raise SystemExit(f"soak: {args.sidecar} is missing; build it with `cargo build --release -p inferpool-sidecar`")
    raw = run(args)
    res = results(raw)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak-results.json").write_text(json.dumps({**res, "machine": raw["machine"], "seconds": raw["seconds"],
                                                            "rate": raw["rate"], "by_kind": raw["by_kind"]}, indent=1) + "\n")
    (args.out / "soak.svg").write_text(svg(raw))
    (args.out / "soak.md").write_text(markdown(raw, res))
    log(f"report in {args.out / 'soak.md'}: growth {res['growth_after_warmup_mb']} MB, {res['unexpected']} unexpected")
    sys.exit(0 if all(t["met"] for t in res["targets"].values()) else 1)


if __name__ == "__main__":
    main()
