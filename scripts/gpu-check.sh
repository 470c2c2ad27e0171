#!/usr/bin/env bash
# Verifies the sidecar's CUDA path on a GPU host and measures it against the CPU on the same host,
# then passes or fails on three checks (printed with their thresholds; exit 1 when one fails):
#   1. HTTP throughput at saturation (fp16) >= 0.8x the raw engine's best fp16 images/s;
#   2. no 504 in the first 30 s of load after the sidecar reports ready (fp16, 64 connections);
#   3. the same image through --provider cuda and --provider cpu (fp32): cosine >= 0.999.
#
#   scripts/gpu-check.sh ORT_GPU_DIR ORT_CPU_LIB IMAGE OUT_DIR
#
# ORT_GPU_DIR holds the onnxruntime-gpu build's libonnxruntime.so, libonnxruntime_providers_shared.so
# and libonnxruntime_providers_cuda.so (from the onnxruntime-gpu wheel on PyPI; CUDA 13, cuBLAS and
# cuDNN 9 must be on the library path). ORT_CPU_LIB is the CPU build's libonnxruntime.so, for the
# baseline. Binaries come from $SIDECAR_BIN, $ENGINE_BENCH_BIN and $LOADGEN_BIN (default:
# target/release). Everything listens on 127.0.0.1 only.
set -euo pipefail
gpu_dir=$1 cpu_lib=$2 image=$3 out=$4
sidecar=${SIDECAR_BIN:-target/release/inferpool-sidecar}
bench=${ENGINE_BENCH_BIN:-target/release/examples/engine_bench}
loadgen=${LOADGEN_BIN:-target/release/examples/loadgen}
seconds=${GPU_CHECK_SECONDS:-5}
mkdir -p "$out"

# fetch URL [IMAGE]: GET, or POST of a JPEG; curl when present, else Python.
fetch() {
  if command -v curl >/dev/null; then
    if [ $# -eq 2 ]; then curl -sf -H 'Content-Type: image/jpeg' --data-binary @"$2" "$1"; else curl -sf "$1"; fi
  else
    python3 -c 'import sys, urllib.request as u
data = open(sys.argv[2], "rb").read() if len(sys.argv) > 2 else None
req = u.Request(sys.argv[1], data=data, headers={"Content-Type": "image/jpeg"})
sys.stdout.buffer.write(u.urlopen(req, timeout=30).read())' "$@"
  fi
}
export LD_LIBRARY_PATH="$gpu_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1 || true
ldd "$gpu_dir/libonnxruntime_providers_cuda.so" | grep "not found" >"$out/missing-libs.txt" || true
nproc >"$out/nproc.txt"

# Raw engine: CPU build vs CUDA build, fp32 (Accuracy) and fp16 (Balanced on a GPU).
# GPU_CHECK_ENGINE=0 skips it (the HTTP checks alone take about a minute).
for b in $([ "${GPU_CHECK_ENGINE:-1}" = 1 ] && echo 1 16 64); do
  ORT_DYLIB_PATH=$cpu_lib "$bench" --image "$image" --batch "$b" --optimization Accuracy \
    --warmup-seconds 1 --seconds "$seconds" --preprocess-seconds 1 >"$out/engine-cpu-fp32-b$b.json"
  for level in Accuracy Balanced; do
    ORT_DYLIB_PATH=$gpu_dir/libonnxruntime.so "$bench" --image "$image" --batch "$b" --optimization "$level" \
      --warmup-seconds 2 --seconds "$seconds" --preprocess-seconds 1 >"$out/engine-cuda-$level-b$b.json"
  done
done

# The sidecar itself with --provider cuda, and the same image on the CPU provider for comparison.
serve() { # name port admin provider optimization
  "$sidecar" --ort-library "$gpu_dir/libonnxruntime.so" --listen "127.0.0.1:$2" --admin-listen "127.0.0.1:$3" \
    --provider "$4" --optimization "$5" --data-dir "$out/data-$1" --max-batch 64 --max-delay-ms 2 \
    --queue-capacity 4096 2>"$out/sidecar-$1.log" &
  echo $! >"$out/$1.pid"
  for _ in $(seq 1 600); do
    fetch "http://127.0.0.1:$2/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$(cat "$out/$1.pid")" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
stop() { kill -TERM "$(cat "$out/$1.pid")" 2>/dev/null || true; wait "$(cat "$out/$1.pid")" 2>/dev/null || true; }
trap 'stop cuda; stop cpu; stop fp16' EXIT

serve cuda 18080 19090 cuda Accuracy
serve cpu 18081 19091 cpu Accuracy
for name_port in cuda:18080 cpu:18081; do
  name=${name_port%%:*} port=${name_port##*:}
  fetch "http://127.0.0.1:$port/api/v1/embed" "$image" >"$out/embed-$name.json"
  fetch "http://127.0.0.1:$port/api/v1/metrics/sla" >"$out/sla-$name.json"
done
python3 - "$out" <<'PY' >"$out/compare.json"
import json, math, sys
out = sys.argv[1]
a = json.load(open(f"{out}/embed-cuda.json"))["embedding"]
b = json.load(open(f"{out}/embed-cpu.json"))["embedding"]
dot = sum(x * y for x, y in zip(a, b))
cos = dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
print(json.dumps({"cosine_cuda_vs_cpu_fp32": cos, "max_abs_diff": max(abs(x - y) for x, y in zip(a, b)),
                  "provider_cuda": json.load(open(f"{out}/sla-cuda.json"))["provider"],
                  "provider_cpu": json.load(open(f"{out}/sla-cpu.json"))["provider"]}))
PY
stop cpu

# HTTP on the GPU (fp16, as Balanced picks): the first 30 s right after ready, then saturation.
stop cuda
serve fp16 18082 19092 cuda Balanced
ulimit -n 65536 || true
load() { # connections seconds output
  "$loadgen" --url http://127.0.0.1:18082/api/v1/embed --body "$image" --header 'Content-Type: image/jpeg' \
    --header 'Cache-Control: no-store' --concurrency "$1" --seconds "$2" >"$3"
}
load 64 "${GPU_CHECK_FIRST_SECONDS:-30}" "$out/http-first.json"
for c in 16 64 256; do
  load "$c" "$seconds" "$out/http-c$c.json"
done
fetch "http://127.0.0.1:18082/metrics" | grep -E '^inferpool_batch_size_(sum|count)' >"$out/batch-fp16.txt" || true
stop fp16

python3 - "$out" <<'PY'
import glob, json, sys
out = sys.argv[1]
engine = max(((json.load(open(f)).get("images_per_s", 0), f) for f in glob.glob(f"{out}/engine-cuda-Balanced-b*.json")),
             default=(0.0, "no engine run"))
http = max(((json.load(open(f))["by_status"].get("200", {}).get("per_second", 0), f) for f in glob.glob(f"{out}/http-c*.json")),
           default=(0.0, "no HTTP run"))
first = json.load(open(f"{out}/http-first.json"))["by_status"]
cosine = json.load(open(f"{out}/compare.json"))["cosine_cuda_vs_cpu_fp32"]
checks = [
    ("HTTP at saturation >= 0.8x raw engine (fp16)", http[0] / engine[0] if engine[0] else 0, ">=", 0.8,
     f"{http[0]:.0f} req/s ({http[1].rsplit('/', 1)[-1]}) / {engine[0]:.0f} images/s ({engine[1].rsplit('/', 1)[-1]})"),
    ("504s in the first 30 s after ready", first.get("504", {}).get("count", 0), "==", 0,
     f"{first.get('200', {}).get('count', 0)} answered 200"),
    ("CUDA vs CPU embedding cosine (fp32)", cosine, ">=", 0.999, ""),
]
failed = 0
for name, value, op, threshold, detail in checks:
    ok = value >= threshold if op == ">=" else value == threshold
    failed += not ok
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.4g} (threshold {op} {threshold}) {detail}")
json.dump([{"check": c[0], "value": c[1], "op": c[2], "threshold": c[3], "detail": c[4]} for c in checks],
          open(f"{out}/checks.json", "w"), indent=1)
sys.exit(1 if failed else 0)
PY
echo "gpu-check done: $out"
