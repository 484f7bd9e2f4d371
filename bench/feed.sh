#!/bin/bash
# The ledger feed's figures (docs/performance.md, "The ledger feed"): 16 callers x 100 users on the
# embedded engine with 0, 1 and 100 WatchLedger streams open (lockstep-bench --watchers), rounds
# alternating the order, 10 s a run on a fresh data dir; then the catch-up: one account with
# CATCH_UP entries replayed to `coordinator watch`. WATCH=feed: WatchFeed streams instead
# (COUNTS, default "0 1 100", says how many), and the catch-up replays the feed.
#   bench/feed.sh [OUTPUT_DIR]     (release binaries: cargo build --release -p lockstep-coordinator -p lockstep-bench)
set -u
BIN=${BIN:-target/release/coordinator}; BENCH=${BENCH:-target/release/lockstep-bench}
ROUNDS=${ROUNDS:-3}; CATCH_UP=${CATCH_UP:-100000}; WATCH=${WATCH:-ledger}; COUNTS=${COUNTS:-"0 1 100"}
out=${1:-bench-results-feed}; mkdir -p "$out"; port=50400
start() { # data-dir log
  port=$((port+1))
  "$BIN" --data-dir "$1" --listen 127.0.0.1:$port --daily-deposit-limit 1000000 --daily-withdrawal-limit 1000000 --daily-transfer-limit 1000000 >"$2" 2>&1 &
  pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
}
for round in $(seq "$ROUNDS"); do
  if (( round % 2 )); then order="$COUNTS"; else order=$(echo "$COUNTS" | tr ' ' '\n' | tac | tr '\n' ' '); fi
  for watchers in $order; do
    data=$(mktemp -d); start "$data" "$out/w$watchers-$round.log"
    "$BENCH" --quiet --json --target http://127.0.0.1:$port --duration 10 --callers 16 --users 100 \
      --watchers "$watchers" --watch "$WATCH" >"$out/w$watchers-$round.json"
    kill -INT $pid; wait $pid; rm -rf "$data"
  done
done
[ "$CATCH_UP" -gt 0 ] || exit 0
# Catch-up: $CATCH_UP transfers of $1.00 between two accounts (each gets an entry per transfer,
# inside the daily limits), then one consumer replays the first account from sequence 0.
data=$(mktemp -d); start "$data" "$out/catch-up.log"
"$BENCH" --quiet --json --target http://127.0.0.1:$port --workload transfer --users 2 --callers 16 \
  --duration 600 --calls "$CATCH_UP" --user-prefix catch-up- --fund-usd 100000.00 >"$out/catch-up-load.json"
begin=$(date +%s.%N)
if [ "$WATCH" = feed ]; then
  "$BIN" watch --server http://127.0.0.1:$port | head -n "$CATCH_UP" | tail -n 1 >"$out/catch-up-last.json"
else
  "$BIN" watch --user catch-up-0 --from 0 --server http://127.0.0.1:$port | head -n "$CATCH_UP" | tail -n 1 >"$out/catch-up-last.json"
fi
end=$(date +%s.%N)
echo "catch-up: $CATCH_UP entries replayed in $(echo "$end - $begin" | bc) s" | tee "$out/catch-up.txt"
kill -INT $pid; wait $pid; rm -rf "$data"
