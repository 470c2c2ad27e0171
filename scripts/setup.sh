#!/usr/bin/env bash
# Prepares everything inferpool needs to build, run and test, under .cache/ in the repository:
#   .cache/onnxruntime/   libonnxruntime.so* unpacked from the pinned `onnxruntime` wheel (PyPI)
#   .cache/venv/          Python tools for the model scripts, reference checks, benchmarks and the
#                         Helm chart's checks (scripts/requirements.txt)
#   models/effnet_lite0/  the default model's ONNX variants (generated, checked against card.json)
#   .cache/photos/        benchmark photos at 640x400, 1920x1080 and 12 MP (scripts/make_photos.py)
# and installs redis-server, openssl and prometheus from Debian and cargo-fuzz from crates.io when missing. Idempotent: each step is
# skipped when its result is already there, so a rerun is fast and works offline once it has run once.
set -euo pipefail

ORT_VERSION=1.31.1
root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache"
mkdir -p "$cache"

log() { printf 'setup: %s\n' "$*" >&2; }

# --- Python venv with pinned tools -------------------------------------------------------------
venv="$cache/venv"
req="$root/scripts/requirements.txt"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating Python venv in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  echo "$want" >"$stamp"
fi

# --- ONNX Runtime shared library, from the wheel on PyPI (no Python needed at run time) ---------
ort_dir="$cache/onnxruntime"
if [ ! -e "$ort_dir/libonnxruntime.so" ] || [ "$(cat "$ort_dir/VERSION" 2>/dev/null)" != "$ORT_VERSION" ]; then
  log "fetching the onnxruntime $ORT_VERSION wheel"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tmp" "onnxruntime==$ORT_VERSION"
  rm -rf "$ort_dir" && mkdir -p "$ort_dir"
  "$venv/bin/python" - "$tmp" "$ort_dir" <<'PY'
import glob, os, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(src, "onnxruntime-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime.so"):
            with z.open(name) as f, open(os.path.join(dst, base), "wb") as out:
                out.write(f.read())
PY
  lib=$(ls "$ort_dir"/libonnxruntime.so.* | head -n1)
  ln -sf "$(basename "$lib")" "$ort_dir/libonnxruntime.so"
  echo "$ORT_VERSION" >"$ort_dir/VERSION"
fi

# --- build tools, redis-server, openssl and prometheus (Debian) --------------------------------
# cmake and nasm build libjpeg-turbo from the turbojpeg crate's bundled source (linked statically;
# Debian 12's libjpeg-turbo 2.1 is older than the API the crate binds). The cache tests start
# their own redis-server; the TLS test makes its certificates with openssl; the autoscaler's
# Prometheus-source test starts its own prometheus (on a free port, with a temporary config and
# TSDB). The disk-fault tests use chattr (e2fsprogs) and unshare (util-linux, with a tmpfs in a
# mount namespace of their own). Only the binaries are used: the packages' services are not started.
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v nasm >/dev/null 2>&1 || missing+=(nasm)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chattr >/dev/null 2>&1 || missing+=(e2fsprogs)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
    # Where systemd runs, the package starts its own server on :9090 (the sidecar's admin port).
    if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
      systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
  else
    log "warning: ${missing[*]} not installed (apt-get install ${missing[*]}); the tests that need them will fail"
  fi
fi

# --- cargo-fuzz (crates.io), for the fuzz targets in fuzz/ (scripts/fuzz.sh) ---------------------
CARGO_FUZZ_VERSION=0.13.2
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION (a few minutes, once)"
  cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

# --- benchmark photos (640x400, 1920x1080, 12 MP) from scikit-image's bundled photos ------------
"$venv/bin/python" "$root/scripts/make_photos.py" --out "$cache/photos" --if-missing >/dev/null

# --- the default model --------------------------------------------------------------------------
"$venv/bin/python" "$root/models/effnet_lite0/convert.py" --out "$root/models/effnet_lite0" --if-missing
log "ready (onnxruntime $ORT_VERSION in $ort_dir)"
