#!/bin/bash
# Issue 16's figure: a reserved order's fills against PlaceBuy. Builds the release binaries,
# starts ONE coordinator on the embedded engine with a fresh data dir, runs lockstep-bench's
# orders workload on it (PlaceBuy for DURATION s, then cycles of ReserveOrder, FillOrder 1 at
# 149.50 and FillOrder 1 at 150.00 for DURATION s; the same CALLERS and USERS), stops it and
# prints the figures (a row per call; FillOrder p99 beside PlaceBuy p99):
#   bench/orders.sh [OUTPUT_DIR]     (DURATION=15 CALLERS=16 USERS=100; JSON=yes for --json;
#                                     BUILD=no to use the binaries as they are)
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$root/target/release/coordinator}; BENCH=${BENCH:-$root/target/release/lockstep-bench}
DURATION=${DURATION:-15}; CALLERS=${CALLERS:-16}; USERS=${USERS:-100}; JSON=${JSON:-no}; BUILD=${BUILD:-yes}
out=${1:-bench-results-orders}; mkdir -p "$out"
if [ "$BUILD" = yes ]; then
  (cd "$root" && cargo build --release -p lockstep-coordinator --bin coordinator && cargo build --release -p lockstep-bench) || exit 1
fi
# Below the ephemeral port range (32768 and up), where outgoing connections take ports first.
port=21701
data=$(mktemp -d); pid=
stop() { [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null && wait "$pid"; rm -rf "$data"; }
trap stop EXIT
# Daily limits far above the funding: each user is funded 100000.00 (about 330 cycles of $299.50).
"$BIN" --data-dir "$data" --listen 127.0.0.1:$port --daily-deposit-limit 1000000 \
  --daily-withdrawal-limit 1000000 --daily-transfer-limit 1000000 >"$out/coordinator.log" 2>&1 &
pid=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
format=(); suffix=txt
[ "$JSON" = yes ] && format=(--json) && suffix=json
command=("$BENCH" --quiet "${format[@]}" --target http://127.0.0.1:$port --workload orders \
  --duration "$DURATION" --callers "$CALLERS" --users "$USERS")
echo "== ${command[*]} ($(uptime))" | tee "$out/command.txt"
"${command[@]}" | tee "$out/orders.$suffix"
status=${PIPESTATUS[0]}
exit "$status"
