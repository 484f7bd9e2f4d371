#!/bin/bash
# Two coordinator binaries in issue 19's deployed setting (docs/performance.md, "WatchFeed"): three
# coordinators on one dynoxide HTTP server 2.5 ms away each way (a 5 ms round trip), calls round
# robin over them, with (AFFINITY=yes, as deploy/ runs them) or without account affinity, 18
# callers x 100 users and 18 callers on one hot user, 15 s a run, rounds alternating the binaries:
#   BEFORE=/path/to/old/coordinator AFTER=target/release/coordinator AFFINITY=no bench/before-after-scale-out.sh [OUTPUT_DIR]
set -u
BEFORE=${BEFORE:?the coordinator binary to compare against}; AFTER=${AFTER:-target/release/coordinator}
BENCH=${BENCH:-target/release/lockstep-bench}; ROUNDS=${ROUNDS:-2}; AFFINITY=${AFFINITY:-no}; LATENCY_MS=${LATENCY_MS:-2.5}
out=${1:-bench-results-before-after-scale-out}; mkdir -p "$out"; work=$(mktemp -d)
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1
limits=(--daily-deposit-limit 1000000 --daily-withdrawal-limit 1000000 --daily-transfer-limit 1000000)
# Below the ephemeral port range (32768 and up), where outgoing connections took ports first.
port=21500; cport=21600
wait_for_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on $1" >&2; return 1; }
run() { # label binary bench-args...
  local label=$1 bin=$2; shift 2
  port=$((port+1))
  "$BENCH" serve-dynoxide --listen 127.0.0.1:$port --file "$work/$label.sqlite3" --latency-ms "$LATENCY_MS" >/dev/null &
  local dyn=$!
  wait_for_port $port
  "$bin" --dynamodb-endpoint http://127.0.0.1:$port create-tables >/dev/null 2>&1
  local pids=() targets=()
  for index in 1 2 3; do
    cport=$((cport+1))
    local extra=()
    [ "$AFFINITY" = yes ] && extra=(--advertise-address "http://127.0.0.1:$cport")
    RUST_LOG=warn "$bin" --dynamodb-endpoint http://127.0.0.1:$port --listen 127.0.0.1:$cport --instance "ba-$index" \
      "${limits[@]}" "${extra[@]}" 2>"$out/$label-$index.log" &
    pids+=($!); targets+=("http://127.0.0.1:$cport")
  done
  for t in "${targets[@]}"; do wait_for_port "${t##*:}"; done
  [ "$AFFINITY" = yes ] && sleep 1.5
  local joined; joined=$(IFS=,; echo "${targets[*]}")
  echo "== $label ($bin, affinity $AFFINITY): $* ($(uptime))" | tee -a "$out/commands.txt"
  "$BENCH" --quiet --json --duration 15 --targets "$joined" "$@" >"$out/$label.json"
  for pid in "${pids[@]}"; do kill -INT "$pid"; wait "$pid"; done
  kill "$dyn"; wait "$dyn" 2>/dev/null
}
for round in $(seq "$ROUNDS"); do
  if (( round % 2 )); then order="before after"; else order="after before"; fi
  for which in $order; do
    if [ "$which" = before ]; then bin=$BEFORE; else bin=$AFTER; fi
    run "$which-$round-u100x18" "$bin" --callers 18 --users 100
    run "$which-$round-hot18" "$bin" --workload hot --callers 18
  done
done
rm -rf "$work"; echo done
