#!/usr/bin/env bash
# Benchmarks the operator's autoscaler (docs/autoscaling.md, docs/operator.md) on this machine,
# with the API server double and the kubelet double in one process
# (tests/examples/bench_autoscaling/) and the release `inferpool-operator` as a child process:
#   scale     N pools (autoscaling on, intervalSeconds 2, min 1) on a fake-mode kubelet: the time
#             until all are Ready, then the operator's CPU, API requests and memory over a
#             steady-state window;
#   reaction  one pool of real sidecars (process mode) under closed-loop `no-store` load that one
#             replica cannot serve within its p95 target: the time from the SLA breach to the
#             scale-out decision and to a ready new replica, over several runs on fresh pools.
# scripts/bench_autoscaling_report.py then writes docs/benchmarks/autoscaling.{md,svg} and
# autoscaling-results.json. Only 127.0.0.1 and the kubelet double's loopback pod IPs are ever
# contacted. Raw files of the run stay in .cache/bench/run-autoscaling-*/.
#
# Environment (all optional):
#   BENCH_AUTOSCALING_POOLS           pools of the scale part (100)
#   BENCH_AUTOSCALING_SETTLE_SECONDS  wait after all are Ready, before measuring (10)
#   BENCH_AUTOSCALING_STEADY_SECONDS  the steady-state window (60)
#   BENCH_AUTOSCALING_RUNS            runs of the reaction part (3)
#   BENCH_AUTOSCALING_WORKERS         concurrent requests of the reaction load (16)
#   BENCH_AUTOSCALING_P95_MS          the reaction pool's sla.p95LatencyMs (100)
#   BENCH_AUTOSCALING_PART            scale, reaction or all (all)
#   BENCH_IMAGE                       the JPEG to send (.cache/bench/astronaut.jpg, made from scikit-image)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

pools=${BENCH_AUTOSCALING_POOLS:-100}
settle=${BENCH_AUTOSCALING_SETTLE_SECONDS:-10}
steady=${BENCH_AUTOSCALING_STEADY_SECONDS:-60}
runs=${BENCH_AUTOSCALING_RUNS:-3}
workers=${BENCH_AUTOSCALING_WORKERS:-16}
p95_ms=${BENCH_AUTOSCALING_P95_MS:-100}
part=${BENCH_AUTOSCALING_PART:-all}
image=${BENCH_IMAGE:-.cache/bench/astronaut.jpg}
py=.cache/venv/bin/python
oha=.cache/tools/bin/oha

log() { printf 'bench-autoscaling: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The operator talks to the double on loopback; a proxy in the environment would swallow that.
unset HTTP_PROXY HTTPS_PROXY ALL_PROXY http_proxy https_proxy all_proxy
# The sidecars' settings come from the pool spec alone.
unset INFERPOOL_REDIS_URL INFERPOOL_MEMORY_ENTRIES INFERPOOL_DISK_MB INFERPOOL_CACHE_DIR \
  INFERPOOL_REDIS_PREFIX INFERPOOL_CACHE_ENCODING

[ -x "$py" ] || die "$py is missing; run \`make setup\`"

# --- tools and inputs ---------------------------------------------------------------------------
. scripts/bench-common.sh

log "building the release operator, sidecar and benchmark"
timeout 3600 cargo build --release -p inferpool-operator -p inferpool-sidecar --bins
timeout 3600 cargo build --release -p inferpool-tests --example bench_autoscaling

run_dir=.cache/bench/run-autoscaling-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$run_dir"
log "raw results go to $run_dir"

cat /proc/loadavg >"$run_dir/loadavg-start"
# Fake pods' SLA reads go to 127.0.0.x:8080 and must be refused; anything listening on port 8080
# of every address would answer them instead.
ss -Hltn 2>/dev/null | awk '$4 ~ /:8080$/' >"$run_dir/listen-8080" || true
{
  printf '{"command": "scripts/bench-autoscaling.sh", "started_utc": "%s", "git_commit": "%s",' \
    "$(date -u +%FT%TZ)" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  printf ' "git_dirty": %s,' "$([ -z "$(git status --porcelain 2>/dev/null)" ] && echo false || echo true)"
  printf ' "pools": %s, "interval_seconds": 2, "settle_seconds": %s, "steady_seconds": %s,' "$pools" "$settle" "$steady"
  printf ' "runs": %s, "workers": %s, "p95_ms": %s, "part": "%s", "nproc": %s,' "$runs" "$workers" "$p95_ms" "$part" "$(nproc)"
  printf ' "image": "%s", "image_bytes": %s, "clk_tck": %s, "rustc": "%s"}\n' \
    "$image" "$(stat -c %s "$image")" "$(getconf CLK_TCK)" "$(rustc --version)"
} >"$run_dir/meta.json"

log "running (about $((settle + steady + 60)) s for the scale part, 1-2 min per reaction run)"
target/release/examples/bench_autoscaling --out "$run_dir" --part "$part" \
  --operator target/release/inferpool-operator --sidecar target/release/inferpool-sidecar \
  --pools "$pools" --interval-seconds 2 --settle-seconds "$settle" --steady-seconds "$steady" \
  --runs "$runs" --workers "$workers" --p95-ms "$p95_ms" --image "$image"

cat /proc/loadavg >"$run_dir/loadavg-end"

# --- the report ---------------------------------------------------------------------------------
"$py" scripts/bench_autoscaling_report.py "$run_dir" --out docs/benchmarks
log "wrote docs/benchmarks/autoscaling.md, autoscaling.svg and autoscaling-results.json"
