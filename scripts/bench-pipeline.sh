#!/usr/bin/env bash
# The request-pipeline benchmark (make bench-pipeline), in one run on this machine:
#   1. the decode limit: decode + resize only, no HTTP, all usable cores, for every candidate JPEG
#      decoder (sidecar/examples/decode_bench.rs), on a 640x400, a 1920x1080 and a 12 MP photo;
#      and the build cost of the two decoder crates that are not the image crate;
#   2. the sidecar over HTTP with the default model and with a near-zero-cost model
#      (scripts/bench_models/near_zero.py), --jpeg-decode reduced and full, at each concurrency
#      level, cache off (Cache-Control: no-store), loaded by sidecar/examples/loadgen.rs with
#      clients that wait Retry-After after a 429, as docs/sidecar.md asks of clients;
#   3. overload: 10x the saturated rate of 12 MP photos (default model, reduced decoding) as an
#      open loop: answers by status, goodput, the latency of the 429s, peak RSS growth;
#   4. the report: scripts/bench_pipeline_report.py writes docs/benchmarks/pipeline.{md,svg} and
#      pipeline-results.json.
# Only 127.0.0.1 is ever contacted. Raw files stay in .cache/bench/pipeline-*/.
#
# Environment (all optional):
#   BENCH_SECONDS           seconds per HTTP level (8)
#   BENCH_LEVELS            concurrency levels ("1 16 64 256")
#   BENCH_DECODE_SECONDS    seconds per decoder and photo (3)
#   BENCH_OVERLOAD_SECONDS  seconds of overload (30)
#   BENCH_OVERLOAD_FACTOR   overload rate as a multiple of the saturated rate (10)
#   BENCH_SKIP_BUILD_COST   1 skips rebuilding the decoder crates to time them
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

level_seconds=${BENCH_SECONDS:-8}
levels=${BENCH_LEVELS:-"1 16 64 256"}
decode_seconds=${BENCH_DECODE_SECONDS:-3}
overload_seconds=${BENCH_OVERLOAD_SECONDS:-30}
overload_factor=${BENCH_OVERLOAD_FACTOR:-10}
py=.cache/venv/bin/python
sidecar=target/release/inferpool-sidecar
loadgen=target/release/examples/loadgen
decode_bench=target/release/examples/decode_bench
photos=.cache/photos
near_zero=.cache/bench-models/near-zero

log() { printf 'bench-pipeline: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
[ -x "$py" ] || die "$py is missing; run \`make setup\`"
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then ulimit -n 65536; else ulimit -n "$hard"; fi

"$py" scripts/make_photos.py --out "$photos" --if-missing
"$py" scripts/bench_models/near_zero.py --out "$near_zero" >&2
sizes="640x400 1920x1080 4032x3024"

log "building the release sidecar, loadgen and decode_bench"
timeout 3600 cargo build --release -p inferpool-sidecar --bins --example loadgen --example decode_bench

run_dir=.cache/bench/pipeline-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$run_dir"
log "raw results go to $run_dir"
{
  printf '{"command": "make bench-pipeline", "started_utc": "%s", "git_commit": "%s", "rustc": "%s",' \
    "$(date -u +%FT%TZ)" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(rustc --version)"
  printf ' "cpu": "%s", "nproc": %s, "memory_gib": %s, "level_seconds": %s, "levels": [%s],' \
    "$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)" "$(nproc)" \
    "$(awk '/MemTotal/{printf "%.1f", $2/1048576}' /proc/meminfo)" "$level_seconds" "$(echo $levels | tr ' ' ',')"
  printf ' "overload_seconds": %s, "overload_factor": %s}\n' "$overload_seconds" "$overload_factor"
} >"$run_dir/meta.json"

# --- 1. the decode limit and the decoders' build cost -------------------------------------------
log "decode limit: every decoder, ${decode_seconds}s per photo"
"$decode_bench" --seconds "$decode_seconds" $(for s in $sizes; do echo --image "$photos/photo-$s.jpg"; done) \
  >"$run_dir/decode.json"
if [ "${BENCH_SKIP_BUILD_COST:-0}" != 1 ]; then
  # jpeg-decoder is only a dev-dependency, which `cargo build -p` cannot build alone: it is timed
  # through the example that uses it (its rebuild plus relinking the example).
  # jpeg-decoder first: rebuilding turbojpeg-sys makes everything above it stale.
  for crate in jpeg-decoder turbojpeg-sys; do
    target=(-p "$crate")
    [ "$crate" = jpeg-decoder ] && target=(-p inferpool-sidecar --example decode_bench)
    log "build cost: cargo build --release ${target[*]} after cleaning $crate"
    cargo clean --release -q -p "$crate"
    start_ns=$(date +%s%N)
    cargo build --release -q "${target[@]}"
    awk -v a="$start_ns" -v b="$(date +%s%N)" -v c="$crate" 'BEGIN{printf "{\"crate\": \"%s\", \"seconds\": %.1f}\n", c, (b-a)/1e9}' \
      >>"$run_dir/build-cost.jsonl"
  done
fi

# --- 2. the HTTP path ---------------------------------------------------------------------------
. scripts/bench-lib.sh
trap stop_sidecar EXIT
trap 'exit 130' INT TERM
sidecar_flags=(--memory-entries 0 --disk-mb 0 --queue-capacity 4096)

load() { # output photo loadgen-args...: one load run, cache off
  local out=$1 photo=$2
  shift 2
  timeout $((level_seconds + overload_seconds + 120)) "$loadgen" --url "$api/api/v1/embed" --body "$photo" \
    --header 'Content-Type: image/jpeg' --header 'Cache-Control: no-store' "$@" >"$out"
}

for model in default near-zero; do
  card=models/effnet_lite0/card.json
  [ "$model" = near-zero ] && card=$near_zero/card.json
  for mode in reduced full; do
    name=$model-$mode
    log "HTTP: $name"
    start_sidecar "$name" --model "$card" --jpeg-decode "$mode"
    for s in $sizes; do
      photo=$photos/photo-$s.jpg
      load "$run_dir/warmup.json" "$photo" --concurrency 16 --seconds 2
      for c in $levels; do
        load "$run_dir/http-$name-$s-c$c.json" "$photo" --concurrency "$c" --seconds "$level_seconds" \
          --honor-retry-after
      done
    done
    curl -fsS "$admin/metrics" >"$run_dir/metrics-$name.txt"
    stop_sidecar
  done
done

# --- 3. overload --------------------------------------------------------------------------------
photo=$photos/photo-4032x3024.jpg
saturated=$(cat "$run_dir"/http-default-reduced-4032x3024-c*.json | "$py" -c '
import json, sys
print(max(json.loads(l)["by_status"].get("200", {}).get("per_second", 0) for l in sys.stdin))')
rate=$(awk -v s="$saturated" -v f="$overload_factor" 'BEGIN{printf "%.1f", s * f}')
log "overload: ${rate}/s of 12 MP photos (${overload_factor}x the saturated ${saturated}/s) for ${overload_seconds}s"
start_sidecar overload --model models/effnet_lite0/card.json --jpeg-decode reduced
load "$run_dir/warmup.json" "$photo" --concurrency 16 --seconds 2
sleep 1
rss_before=$(awk '/VmRSS/{print $2 * 1024}' "/proc/$sidecar_pid/status")
echo 5 >"/proc/$sidecar_pid/clear_refs" # resets the peak RSS (VmHWM) to the current RSS
load "$run_dir/overload.json" "$photo" --rate "$rate" --max-inflight 8192 --seconds "$overload_seconds"
rss_peak=$(awk '/VmHWM/{print $2 * 1024}' "/proc/$sidecar_pid/status")
curl -fsS "$admin/metrics" >"$run_dir/metrics-overload.txt"
printf '{"saturated_per_second": %s, "rate": %s, "rss_before_bytes": %s, "rss_peak_bytes": %s}\n' \
  "$saturated" "$rate" "$rss_before" "$rss_peak" >"$run_dir/overload-meta.json"
stop_sidecar

# --- 4. the report ------------------------------------------------------------------------------
"$py" scripts/bench_pipeline_report.py "$run_dir" --out docs/benchmarks
log "wrote docs/benchmarks/pipeline.md, pipeline.svg and pipeline-results.json"
