# Sourced by the benchmark scripts: the load generator, the test image, CPU counters and stopping
# a sidecar (bench-lib.sh). Expects $oha, $image, $py and log() from the caller.

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

# free_port, stop_process, start_sidecar, stop_sidecar
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
