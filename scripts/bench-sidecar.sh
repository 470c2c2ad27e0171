#!/usr/bin/env bash
# Benchmarks the sidecar on this machine, in one run:
#   1. the raw engine (sidecar/examples/engine_bench.rs): batches straight into ONNX Runtime, plus
#      the per-image cost of decode + resize + normalise on one thread;
#   2. the HTTP path: the release sidecar on loopback, loaded by oha at several concurrency levels
#      with a real JPEG, reading the sidecar's /metrics and CPU time before and after each level;
#   3. the report: scripts/bench_report.py writes docs/benchmarks/sidecar.{md,svg} and
#      sidecar-results.json.
# Only 127.0.0.1 is ever contacted. Raw files of the run stay in .cache/bench/run-*/.
#
# Environment (all optional):
#   BENCH_SECONDS         seconds per concurrency level (15)
#   BENCH_LEVELS          concurrency levels ("1 16 64 256 1000")
#   BENCH_THREADS         intra-op threads for the engine and the sidecar (nproc)
#   BENCH_BATCH           batch size: the engine's batch and the sidecar's --max-batch (16)
#   BENCH_ENGINE_SECONDS  timed seconds of the raw engine run (20)
#   BENCH_IMAGE           the JPEG to send (.cache/bench/astronaut.jpg, made from scikit-image)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

level_seconds=${BENCH_SECONDS:-15}
levels=${BENCH_LEVELS:-"1 16 64 256 1000"}
threads=${BENCH_THREADS:-$(nproc)}
batch=${BENCH_BATCH:-16}
engine_seconds=${BENCH_ENGINE_SECONDS:-20}
image=${BENCH_IMAGE:-.cache/bench/astronaut.jpg}
py=.cache/venv/bin/python
oha=.cache/tools/bin/oha
sidecar=target/release/inferpool-sidecar
engine_bench=target/release/examples/engine_bench

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# 1000 connections need 1000 sockets on each side, plus the runtime's own files.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then ulimit -n 65536; else ulimit -n "$hard"; fi
[ "$(ulimit -n)" -ge 2200 ] || die "the file-descriptor limit is $(ulimit -n); 1000 connections need more"

[ -x "$py" ] || die "$py is missing; run \`make setup\`"

# --- tools and inputs ---------------------------------------------------------------------------
. scripts/bench-common.sh

log "building the release sidecar and engine_bench"
timeout 3600 cargo build --release -p inferpool-sidecar --bins --example engine_bench

run_dir=.cache/bench/run-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$run_dir"
log "raw results go to $run_dir"


cat /proc/loadavg >"$run_dir/loadavg-start"
{
  printf '{"command": "make bench", "started_utc": "%s", "level_seconds": %s, "threads": %s, "batch": %s,' \
    "$(date -u +%FT%TZ)" "$level_seconds" "$threads" "$batch"
  printf ' "levels": [%s], "image": "%s", "git_commit": "%s", "oha": "%s", "rustc": "%s"}\n' \
    "$(echo $levels | tr ' ' ',')" "$image" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$("$oha" --version | head -n1)" "$(rustc --version)"
} >"$run_dir/meta.json"

# --- 1. the raw engine --------------------------------------------------------------------------
log "raw engine: batch $batch, $threads threads, ${engine_seconds}s"
timeout $((engine_seconds + 300)) "$engine_bench" --image "$image" --batch "$batch" --threads "$threads" \
  --seconds "$engine_seconds" >"$run_dir/engine.json"
cat "$run_dir/engine.json" >&2

# --- 2. the HTTP path ---------------------------------------------------------------------------
read -r port admin_port < <("$py" -c '
import socket
a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])')
api=http://127.0.0.1:$port
admin=http://127.0.0.1:$admin_port
data_dir=$(mktemp -d)
sidecar_pid=
stop_sidecar() {
  stop_process "$sidecar_pid"
  sidecar_pid=
  rm -rf "$data_dir"
}
trap stop_sidecar EXIT
trap 'exit 130' INT TERM

log "starting the sidecar on $api (admin $admin)"
INFERPOOL_LOG=info,ort=warn "$sidecar" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
  --data-dir "$data_dir" --threads "$threads" --max-batch "$batch" --shutdown-grace-seconds 5 \
  2>"$run_dir/sidecar.log" &
sidecar_pid=$!
for _ in $(seq 240); do
  curl -fsS -o /dev/null "$api/readyz" 2>/dev/null && break
  kill -0 "$sidecar_pid" 2>/dev/null || die "the sidecar exited; see $run_dir/sidecar.log"
  sleep 0.5
done
curl -fsS -o /dev/null "$api/readyz" || die "the sidecar was not ready within 120 s; see $run_dir/sidecar.log"
# For a listening socket ss shows the accept backlog in the Send-Q column.
ss -Hltn "sport = :$port" >"$run_dir/listen-socket" 2>/dev/null || true
# `no-store` on every request: the model runs each time and nothing is written to the cache tiers,
# so this measures inference, not the cache (scripts/bench-cache.sh measures that).
curl -fsS -o "$run_dir/embed-sample.json" -H 'Content-Type: image/jpeg' -H 'Cache-Control: no-store' \
  --data-binary "@$image" "$api/api/v1/embed" || die "a single embed request failed"

oha_cmd=("$oha" --no-tui --output-format json --stats-success-breakdown --wait-ongoing-requests-after-deadline
  -m POST -H 'Content-Type: image/jpeg' -H 'Cache-Control: no-store' -D "$image")
oha_run() { # concurrency seconds output: one load level, its CPU time recorded in output.time
  /usr/bin/time -f '%e %U %S' -o "$3.time" timeout $(($2 + 120)) "${oha_cmd[@]}" -z "${2}s" -c "$1" \
    "$api/api/v1/embed" >"$3"
}
metric() { # name: its value on the admin /metrics
  curl -fsS "$admin/metrics" | awk -v m="$1" '$1 == m {print $2}'
}
wait_idle() { # until no batch has run for a second: every request of the last level has ended
  local last now
  last=$(metric inferpool_batch_size_count)
  for _ in $(seq 20); do
    sleep 1
    now=$(metric inferpool_batch_size_count)
    [ "$now" = "$last" ] && return 0
    last=$now
  done
  log "warning: batches still running 20 s after the level ended"
}

log "warm-up: 3 s at concurrency 16 (not recorded)"
oha_run 16 3 "$run_dir/warmup.oha.json"
wait_idle

for c in $levels; do
  log "concurrency $c for ${level_seconds}s"
  sleep 1
  pre=$run_dir/level-$c
  curl -fsS "$admin/metrics" >"$pre.metrics-before"
  cat /proc/net/netstat /proc/net/snmp >"$pre.net-before"
  read -r busy0 total0 < <(machine_ticks)
  server0=$(proc_ticks "$sidecar_pid")
  start_ns=$(date +%s%N)
  oha_run "$c" "$level_seconds" "$pre.oha.json"
  end_ns=$(date +%s%N)
  server1=$(proc_ticks "$sidecar_pid")
  read -r busy1 total1 < <(machine_ticks)
  curl -fsS "$admin/metrics" >"$pre.metrics-after"
  cat /proc/net/netstat /proc/net/snmp >"$pre.net-after"
  printf '{"wall_s": %s, "server_cpu_s": %s, "machine_busy_cpu_s": %s, "machine_total_cpu_s": %s, "loadavg": "%s"}\n' \
    "$(awk -v a="$start_ns" -v b="$end_ns" 'BEGIN{printf "%.3f", (b-a)/1e9}')" \
    "$(awk -v a="$server0" -v b="$server1" 'BEGIN{printf "%.2f", (b-a)/100}')" \
    "$(awk -v a="$busy0" -v b="$busy1" 'BEGIN{printf "%.2f", (b-a)/100}')" \
    "$(awk -v a="$total0" -v b="$total1" 'BEGIN{printf "%.2f", (b-a)/100}')" \
    "$(cut -d' ' -f1-3 /proc/loadavg)" >"$pre.cpu.json"
  kill -0 "$sidecar_pid" 2>/dev/null || die "the sidecar died at concurrency $c; see $run_dir/sidecar.log"
  wait_idle
  # What the queue-depth gauge says once nothing is queued any more.
  metric inferpool_queue_depth >"$pre.queue-depth-idle"
done

stop_sidecar
cat /proc/loadavg >"$run_dir/loadavg-end"

# --- 3. the report ------------------------------------------------------------------------------
"$py" scripts/bench_report.py "$run_dir" --out docs/benchmarks
log "wrote docs/benchmarks/sidecar.md, sidecar.svg and sidecar-results.json"
