# Sourced by the benchmark scripts: the load generator, the test image, CPU counters and stopping
# a sidecar. Expects $oha, $image, $py and log() from the caller.

if [ ! -x "$oha" ]; then
  log "installing oha into .cache/tools (once; a slow compile)"
  timeout 3600 cargo install oha --locked --root .cache/tools
fi

mkdir -p .cache/bench
if [ ! -s "$image" ]; then
  log "making $image from scikit-image's astronaut.png (JPEG quality 90)"
  "$py" - "$image" <<'PY'
import sys
from pathlib import Path
import skimage
from PIL import Image
src = Path(skimage.__file__).parent / "data" / "astronaut.png"
Image.open(src).convert("RGB").save(sys.argv[1], quality=90)
PY
fi

# Machine-wide CPU time in USER_HZ ticks: "busy total" from the first line of /proc/stat.
machine_ticks() { awk '/^cpu /{t=0; for(i=2;i<=NF;i++) t+=$i; print t-$5-$6, t}' /proc/stat; }
# User + system CPU ticks of one process.
proc_ticks() { awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat"; }

stop_process() { # pid: SIGTERM, then SIGKILL after 10 s (a sidecar drains for its 5 s grace here)
  if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
  fi
}
