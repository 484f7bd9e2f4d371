#!/bin/bash
# Two coordinator binaries on the embedded engine (docs/performance.md, "The redesign: the four
# operations before and after"): alternating rounds of 10 s per load on fresh data dirs, one bench
# binary, and each coordinator's own CPU time:
#   BEFORE=/path/to/old/coordinator AFTER=target/release/coordinator bench/before-after.sh [OUTPUT_DIR]
# (BEFORE_FLAGS: flags only the old binary lacks are left out of its command, e.g. "" for a build
# without --daily-transfer-limit.)
set -u
BEFORE=${BEFORE:?the coordinator binary to compare against}; AFTER=${AFTER:-target/release/coordinator}
BENCH=${BENCH:-target/release/lockstep-bench}; ROUNDS=${ROUNDS:-5}
out=${1:-bench-results-before-after}; mkdir -p "$out"
port=50300; tick=$(getconf CLK_TCK)
run() { # label binary extra bench-args...
  local label=$1 bin=$2 extra=$3; shift 3
  port=$((port+1)); local data; data=$(mktemp -d)
  # shellcheck disable=SC2086
  "$bin" --data-dir "$data" --listen 127.0.0.1:$port --daily-deposit-limit 1000000 --daily-withdrawal-limit 1000000 $extra >"$out/$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  local cpu0; cpu0=$(awk '{print $14+$15}' /proc/$pid/stat)
  "$BENCH" --quiet --json --target http://127.0.0.1:$port --duration 10 "$@" >"$out/$label.json"
  local cpu1; cpu1=$(awk '{print $14+$15}' /proc/$pid/stat)
  echo "$label $(( (cpu1-cpu0) * 1000 / tick ))" >>"$out/cpu-ms.txt"
  kill -INT $pid; wait $pid; rm -rf "$data"
}
T="--daily-transfer-limit 1000000"
for round in $(seq "$ROUNDS"); do
  for load in "u64:--callers 64 --users 1000" "hot16:--workload hot --callers 16"; do
    name=${load%%:*}; args=${load#*:}
    # shellcheck disable=SC2086
    if (( round % 2 )); then
      run "$name-before-$round" "$BEFORE" "${BEFORE_FLAGS:-}" $args; run "$name-new-$round" "$AFTER" "$T" $args
    else
      run "$name-new-$round" "$AFTER" "$T" $args; run "$name-before-$round" "$BEFORE" "${BEFORE_FLAGS:-}" $args
    fi
  done
done
echo done
