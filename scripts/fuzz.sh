#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each, starting from the
# committed seeds in fuzz/seeds/<target>/ plus what earlier runs found (fuzz/corpus/, not
# committed). A crash, a failed assertion, a leak of the pixel limit or a hang stops the run with
# a non-zero status; the input that caused it is in fuzz/artifacts/<target>/ and can be replayed
# with `cd fuzz && cargo fuzz run <target> artifacts/<target>/<file>`.
#
# fuzz/ is a workspace of its own (cargo-fuzz builds it with its instrumentation flags); its
# Cargo.lock is the main Cargo.lock plus the fuzzing crates, so the code fuzzed is built from the
# same dependency versions as the shipped one: copy Cargo.lock over it after updating those.
#
#   scripts/fuzz.sh [SECONDS]     default 30 (make test); make fuzz runs 600 each
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-30}"
command -v cargo-fuzz >/dev/null 2>&1 || { echo "fuzz: cargo-fuzz is missing; run make setup" >&2; exit 1; }
# libFuzzer's coverage instrumentation needs no sanitizer; the stable toolchain is allowed the
# one unstable flag cargo-fuzz passes (`-Zsanitizer` is not used with `-s none`).
export RUSTC_BOOTSTRAP=1
echo "fuzz: building the targets (release, coverage-instrumented)" >&2
cargo fuzz build -s none --release
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target" "seeds/$target"
  if ! cargo fuzz run -s none --release "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $target failed; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  found=$(sed -n 's/^stat::new_units_added: *//p' "$log")
  echo "fuzz: $target: ${runs:-?} inputs in ${seconds}s, ${found:-?} new coverage units, no crash" >&2
done
