#!/usr/bin/env bash
# Benchmarks the embedding cache (docs/cache.md) on this machine, in one run: the same image sent
# by oha to the release sidecar on loopback, once per way of answering it:
#   miss    sidecar A, `Cache-Control: no-store` on every request: the model runs every time;
#   memory  sidecar A, plain requests after one warm request: every request is an L1 hit;
#   disk    sidecar B with L1 off (`--memory-entries 0`) and no Redis: every request is an L2 hit;
#   redis   sidecar C with L1 and L2 off, on the Redis that A stored the entry in: every request
#           is an L3 hit.
# Before each phase one request checks, from the answer's `cache` field, that the phase hits the
# tier it claims; the sidecar's /metrics before and after each phase show how many inferences and
# hits per tier it actually ran. After each phase a short run at concurrency 1 measures the
# latency of one request alone. scripts/bench_cache_report.py then writes
# docs/benchmarks/cache.{md,svg} and cache-results.json.
# Only 127.0.0.1 is ever contacted. Raw files of the run stay in .cache/bench/run-*/.
#
# Environment (all optional):
#   BENCH_CACHE_CONCURRENCY      connections of each measured phase (64)
#   BENCH_CACHE_SECONDS          seconds per phase (10)
#   BENCH_CACHE_LATENCY_SECONDS  seconds of the concurrency-1 run after each phase (5; 0 skips it)
#   BENCH_THREADS                the sidecar's intra-op threads (nproc)
#   BENCH_IMAGE                  the JPEG to send (.cache/bench/astronaut.jpg, made from scikit-image)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

concurrency=${BENCH_CACHE_CONCURRENCY:-64}
phase_seconds=${BENCH_CACHE_SECONDS:-10}
latency_seconds=${BENCH_CACHE_LATENCY_SECONDS:-5}
threads=${BENCH_THREADS:-$(nproc)}
image=${BENCH_IMAGE:-.cache/bench/astronaut.jpg}
py=.cache/venv/bin/python
oha=.cache/tools/bin/oha
sidecar=target/release/inferpool-sidecar

log() { printf 'bench-cache: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Each phase's tiers are chosen by flags alone; a cache setting left in the environment (the
# sidecar reads INFERPOOL_* variables) would silently add a tier to a phase that must not have it.
unset INFERPOOL_REDIS_URL INFERPOOL_MEMORY_ENTRIES INFERPOOL_DISK_MB INFERPOOL_CACHE_DIR \
  INFERPOOL_REDIS_PREFIX INFERPOOL_CACHE_ENCODING

[ -x "$py" ] || die "$py is missing; run \`make setup\`"
command -v redis-server >/dev/null || die "redis-server is missing; run \`make setup\`"
command -v redis-cli >/dev/null || die "redis-cli is missing (it comes with redis-server); run \`make setup\`"

# --- tools and inputs ---------------------------------------------------------------------------
. scripts/bench-common.sh

log "building the release sidecar"
timeout 3600 cargo build --release -p inferpool-sidecar --bins

run_dir=.cache/bench/run-cache-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$run_dir"
log "raw results go to $run_dir"

cat /proc/loadavg >"$run_dir/loadavg-start"
{
  printf '{"command": "scripts/bench-cache.sh", "started_utc": "%s", "git_commit": "%s",' \
    "$(date -u +%FT%TZ)" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  printf ' "concurrency": %s, "phase_seconds": %s, "latency_seconds": %s, "threads": %s, "nproc": %s,' \
    "$concurrency" "$phase_seconds" "$latency_seconds" "$threads" "$(nproc)"
  printf ' "image": "%s", "image_bytes": %s, "oha": "%s", "redis": "%s", "rustc": "%s"}\n' \
    "$image" "$(stat -c %s "$image")" "$("$oha" --version | head -n1)" \
    "$(redis-server --version | head -n1)" "$(rustc --version)"
} >"$run_dir/meta.json"

# --- Redis --------------------------------------------------------------------------------------
redis_port=$(free_port)
redis_pid=
sidecar_flags=(--threads "$threads")
stop_all() {
  stop_sidecar
  if [ -n "$redis_pid" ] && kill -0 "$redis_pid" 2>/dev/null; then
    kill -TERM "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
  redis_pid=
}
trap stop_all EXIT
trap 'exit 130' INT TERM

log "starting redis-server on 127.0.0.1:$redis_port (no persistence)"
# No RDB snapshots and no AOF: a save in the middle of a phase would take CPU from it.
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --logfile "$root/$run_dir/redis.log" &
redis_pid=$!
for _ in $(seq 50); do
  [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && break
  kill -0 "$redis_pid" 2>/dev/null || die "redis-server exited; see $run_dir/redis.log"
  sleep 0.1
done
[ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] || die "redis-server did not answer; see $run_dir/redis.log"
redis_url=redis://127.0.0.1:$redis_port

# --- sidecars: start_sidecar / stop_sidecar from bench-lib.sh ---------------------------------

embed_once() { # output extra-curl-args...: one request; prints the answer's `cache` field
  local out=$1
  shift
  curl -fsS -o "$out" -H 'Content-Type: image/jpeg' "$@" --data-binary "@$image" "$api/api/v1/embed" ||
    die "an embed request failed"
  "$py" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("cache"))' "$out"
}
expect_cache() { # phase want extra-curl-args...: the check request before a phase
  local phase=$1 want=$2 got
  shift 2
  got=$(embed_once "$run_dir/$phase.check.json" "$@")
  [ "$got" = "$want" ] || die "phase $phase: the answer says \"cache\":\"$got\", expected \"$want\""
  log "phase $phase: check request answered with \"cache\":\"$want\""
}
await_cache() { # phase want: retries the check request (the entry is written behind the answer)
  local phase=$1 want=$2 got i
  for i in $(seq 50); do
    got=$(embed_once "$run_dir/$phase.check.json")
    [ "$got" = "$want" ] && break
    [ "$i" -lt 50 ] || die "phase $phase: the answer still says \"cache\":\"$got\" after 50 tries, expected \"$want\""
    sleep 0.1
  done
  log "phase $phase: check request answered with \"cache\":\"$want\" (try $i)"
  echo "$i" >"$run_dir/$phase.check-tries"
}

# /usr/bin/time gives oha's own CPU time: on a machine with few cores the load generator takes CPU
# the sidecar would otherwise have, and the report says how much.
measure() { # prefix connections seconds extra-oha-args...: one timed load run with counters around it
  local pre=$1 c=$2 s=$3
  shift 3
  local busy0 total0 busy1 total1 server0 server1 redis0 redis1 start_ns end_ns
  sleep 1
  curl -fsS "$admin/metrics" >"$pre.metrics-before"
  redis-cli -p "$redis_port" info stats >"$pre.redis-before"
  read -r busy0 total0 < <(machine_ticks)
  server0=$(proc_ticks "$sidecar_pid")
  redis0=$(proc_ticks "$redis_pid")
  start_ns=$(date +%s%N)
  /usr/bin/time -f '%e %U %S' -o "$pre.oha.json.time" timeout $((s + 120)) \
    "$oha" --no-tui --output-format json --stats-success-breakdown --wait-ongoing-requests-after-deadline \
    -m POST -H 'Content-Type: image/jpeg' "$@" -D "$image" -z "${s}s" -c "$c" "$api/api/v1/embed" >"$pre.oha.json"
  end_ns=$(date +%s%N)
  server1=$(proc_ticks "$sidecar_pid")
  redis1=$(proc_ticks "$redis_pid")
  read -r busy1 total1 < <(machine_ticks)
  curl -fsS "$admin/metrics" >"$pre.metrics-after"
  redis-cli -p "$redis_port" info stats >"$pre.redis-after"
  printf '{"connections": %s, "wall_s": %s, "server_cpu_s": %s, "redis_cpu_s": %s, "machine_busy_cpu_s": %s, "machine_total_cpu_s": %s, "loadavg": "%s"}\n' \
    "$c" "$(awk -v a="$start_ns" -v b="$end_ns" 'BEGIN{printf "%.3f", (b-a)/1e9}')" \
    "$(awk -v a="$server0" -v b="$server1" 'BEGIN{printf "%.2f", (b-a)/100}')" \
    "$(awk -v a="$redis0" -v b="$redis1" 'BEGIN{printf "%.2f", (b-a)/100}')" \
    "$(awk -v a="$busy0" -v b="$busy1" 'BEGIN{printf "%.2f", (b-a)/100}')" \
    "$(awk -v a="$total0" -v b="$total1" 'BEGIN{printf "%.2f", (b-a)/100}')" \
    "$(cut -d' ' -f1-3 /proc/loadavg)" >"$pre.cpu.json"
  kill -0 "$sidecar_pid" 2>/dev/null || die "the sidecar died during $pre; see its log in $run_dir"
}
run_phase() { # phase extra-oha-args...: the measured run, then the same alone at concurrency 1
  local phase=$1
  shift
  log "phase $phase: concurrency $concurrency for ${phase_seconds}s"
  measure "$run_dir/$phase" "$concurrency" "$phase_seconds" "$@"
  if [ "$latency_seconds" -gt 0 ]; then
    log "phase $phase: concurrency 1 for ${latency_seconds}s"
    measure "$run_dir/$phase-c1" 1 "$latency_seconds" "$@"
  fi
}

# Sidecar A: L1, L2 and L3 as a default replica has them. `no-store` runs the model on every
# request and stores nothing, so the miss phase leaves no entry behind for the memory phase.
start_sidecar A --redis-url "$redis_url"
# The model's first runs are slower (allocations, thread start-up); warm it before measuring.
log "warm-up: 3 s at concurrency 16 with no-store (not recorded)"
"$oha" --no-tui --output-format json -m POST -H 'Content-Type: image/jpeg' -H 'Cache-Control: no-store' \
  -D "$image" -z 3s -c 16 "$api/api/v1/embed" >"$run_dir/warmup.oha.json"
expect_cache miss bypass -H 'Cache-Control: no-store'
run_phase miss -H 'Cache-Control: no-store'

# The first plain request runs the model and stores the entry: in L1 at once, in L2 and in Redis
# through the write-behind queue (which the redis phase relies on).
expect_cache warm miss
expect_cache memory memory
run_phase memory
stop_sidecar

# Sidecar B: L2 only. Its own data directory, so its disk tier starts empty: the warm request
# stores the entry and every later request reads that file.
start_sidecar B --memory-entries 0
expect_cache disk-warm miss
# The disk write is queued behind the answer; retry until it has landed.
await_cache disk disk
run_phase disk
stop_sidecar

# Sidecar C: L3 only, on the Redis that A wrote to. A's write-behind has had the whole memory
# phase to land; the key must be in Redis before C starts, or C's own first miss would store it and
# hide that A's write never arrived.
for i in $(seq 50); do
  [ -n "$(redis-cli -p "$redis_port" --scan --pattern 'inferpool:emb:*')" ] && break
  [ "$i" -lt 50 ] || die "phase redis: sidecar A's entry never reached Redis"
  sleep 0.1
done
redis-cli -p "$redis_port" --scan --pattern 'inferpool:emb:*' >"$run_dir/redis-keys"
start_sidecar C --memory-entries 0 --disk-mb 0 --redis-url "$redis_url"
# Retry briefly all the same: C connects to Redis in the background after it starts.
await_cache redis redis
run_phase redis
stop_sidecar

cat /proc/loadavg >"$run_dir/loadavg-end"

# --- the report ---------------------------------------------------------------------------------
"$py" scripts/bench_cache_report.py "$run_dir" --out docs/benchmarks
log "wrote docs/benchmarks/cache.md, cache.svg and cache-results.json"
