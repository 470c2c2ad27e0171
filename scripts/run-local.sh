#!/usr/bin/env bash
# make run: the whole system on this machine. The local control plane (API server double and a
# kubelet that runs real sidecar processes), the operator, and examples/cpu-pool.yaml applied to
# them; prints the pool's local address once it is Ready. Ctrl-C stops everything.
#
#   INFERPOOL_RUN_PORT   local port of the pool's Service proxy (default 8000)
#   INFERPOOL_RUN_POOL   manifest to apply (default examples/cpu-pool.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."

port="${INFERPOOL_RUN_PORT:-8000}"
manifest="${INFERPOOL_RUN_POOL:-examples/cpu-pool.yaml}"
state=.cache/local
mkdir -p "$state"
kubeconfig="$state/kubeconfig"

# Not quiet: a first build on a fresh machine takes several minutes, and cargo's progress shows it.
echo "building the sidecar, the operator and the control plane (release; several minutes the first time)"
cargo build --release -p inferpool-sidecar -p inferpool-operator -p inferpool-tests --bins
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"

# The pool's name and namespace, for the proxy and the readiness check.
read -r pool namespace < <(python3 - "$manifest" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
name = re.search(r"^\s+name:\s*(\S+)", text, re.M).group(1)
ns = re.search(r"^\s+namespace:\s*(\S+)", text, re.M)
print(name, ns.group(1) if ns else "default")
PY
)

pids=()
cleanup() {
    trap - EXIT
    echo
    echo "stopping the operator and the control plane (and every sidecar it runs)"
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -f "$kubeconfig"
"$target/inferpool-local" up --kubeconfig "$kubeconfig" --mode process \
    --sidecar-bin "$target/inferpool-sidecar" --proxy "127.0.0.1:$port=$namespace/$pool" \
    >"$state/control-plane.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [[ -s "$kubeconfig" ]] && break; sleep 0.1; done
[[ -s "$kubeconfig" ]] || { echo "the control plane did not start; see $state/control-plane.log" >&2; exit 1; }
server="$(sed -n 's/^ *server: //p' "$kubeconfig")"
echo "control plane: $server (kubeconfig $kubeconfig, log $state/control-plane.log)"

# The key the pools' admin tokens derive from: made once, kept with the control plane's state.
admin_key="$state/admin-key"
[[ -s "$admin_key" ]] || (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$admin_key")
KUBECONFIG="$kubeconfig" "$target/inferpool-operator" run --leader-election false --log-format text \
    --listen 127.0.0.1:0 --admin-key-file "$admin_key" >"$state/operator.log" 2>&1 &
pids+=($!)
echo "operator: log $state/operator.log"

"$target/inferpool-local" apply -f "$manifest" --kubeconfig "$kubeconfig"

echo "waiting for $namespace/$pool to be Ready (the model loads in each replica)..."
url="$server/apis/inferpool.dev/v1alpha1/namespaces/$namespace/inferencepools/$pool"
ready() {
    curl -sf "$url" 2>/dev/null | python3 -c '
import json, sys
try:
    status = json.load(sys.stdin).get("status", {})
except ValueError:
    sys.exit(1)
ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
sys.exit(0 if ready and ready[0]["status"] == "True" else 1)'
}
for _ in $(seq 600); do
    ready && break
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "a component stopped; see $state/*.log:" >&2; tail -n 5 "$state"/*.log >&2; exit 1; }
    done
    sleep 0.5
done
ready || { echo "$pool did not become Ready in 5 minutes; see $state/*.log" >&2; exit 1; }

photo="$(ls .cache/venv/lib/python3*/site-packages/skimage/data/chelsea.png 2>/dev/null | head -n 1)"
cat <<EOF2

$pool is Ready. Its Service answers on http://127.0.0.1:$port (round robin over the ready replicas):
  PHOTO=${photo:-photo.png}
  curl -s -H 'Content-Type: image/png' --data-binary @"\$PHOTO" http://127.0.0.1:$port/api/v1/embed | head -c 200
  python3 -c "import base64,json,sys; print(json.dumps({'references':[{'id':'ref','image_b64':base64.b64encode(open(sys.argv[1],'rb').read()).decode()}]}))" "\$PHOTO" > /tmp/profile.json
  curl -s -X PUT -H 'Content-Type: application/json' --data-binary @/tmp/profile.json http://127.0.0.1:$port/api/v1/profiles/cats
  curl -s -H 'Content-Type: image/png' --data-binary @"\$PHOTO" 'http://127.0.0.1:$port/api/v1/match?profile=cats'
The pool, with kubectl 1.37 from make setup (any kubectl works with this kubeconfig):
  export KUBECONFIG=$kubeconfig
  .cache/venv/bin/kubectl get ipool                 # the printer columns: READY, REPLICAS, P95(MS), SLA...
  .cache/venv/bin/kubectl describe ipool $pool      # status, conditions and the operator's Events
  .cache/venv/bin/kubectl get events
  .cache/venv/bin/kubectl scale ipool $pool --replicas=3
  .cache/venv/bin/kubectl get deploy,svc,po
Change it: edit $manifest, then .cache/venv/bin/kubectl apply --validate=false -f $manifest
  (or $target/inferpool-local apply -f $manifest --kubeconfig $kubeconfig)
Ctrl-C stops everything.
EOF2
wait -n "${pids[@]}"
