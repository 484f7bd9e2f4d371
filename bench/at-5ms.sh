#!/bin/bash
# Issue 19's setting (docs/performance.md, "At 5 ms from storage"): a dynoxide HTTP server 2.5 ms
# away each way (a 5 ms round trip), one coordinator against three on the same table (every call to
# the next, --targets), two coordinator binaries (OLD, NEW) with one bench binary, 15 s a run:
#   OLD=/path/to/old/coordinator NEW=target/release/coordinator bench/at-5ms.sh [OUTPUT_DIR]
set -u
OLD=${OLD:?the coordinator binary to compare against}; NEW=${NEW:-target/release/coordinator}
BENCH=${BENCH:-target/release/lockstep-bench}
out=${1:-bench-results-5ms}; mkdir -p "$out"; work=$(mktemp -d)
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1
limits=(--daily-deposit-limit 1000000 --daily-withdrawal-limit 1000000 --daily-transfer-limit 1000000)
port=8100; cport=50200
wait_for_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on $1" >&2; return 1; }
run() { # label binary coordinators latency bench-args...
  local label=$1 bin=$2 count=$3 latency=$4; shift 4
  port=$((port+1))
  "$BENCH" serve-dynoxide --listen 127.0.0.1:$port --file "$work/$label.sqlite3" --latency-ms "$latency" >/dev/null &
  local dyn=$!
  wait_for_port $port
  "$bin" --dynamodb-endpoint http://127.0.0.1:$port create-tables >/dev/null 2>&1
  local pids=() targets=()
  for index in $(seq "$count"); do
    cport=$((cport+1))
    "$bin" --dynamodb-endpoint http://127.0.0.1:$port --listen 127.0.0.1:$cport --instance "ms-$index" "${limits[@]}" 2>"$out/$label-$index.log" &
    pids+=($!); targets+=("http://127.0.0.1:$cport")
  done
  for t in "${targets[@]}"; do wait_for_port "${t##*:}"; done
  local joined; joined=$(IFS=,; echo "${targets[*]}")
  echo "== $label: $count coordinator(s), ${latency} ms each way, $* ($(uptime))" | tee -a "$out/commands.txt"
  "$BENCH" --quiet --json --duration 15 --targets "$joined" "$@" >"$out/$label.json"
  for pid in "${pids[@]}"; do kill -INT "$pid"; wait "$pid"; done
  kill "$dyn"; wait "$dyn" 2>/dev/null
}
for version in OLD NEW; do
  bin=${!version}
  run "$version-one-hot18" "$bin" 1 2.5 --workload hot --callers 18
  run "$version-three-hot18" "$bin" 3 2.5 --workload hot --callers 18
  run "$version-one-u100x18" "$bin" 1 2.5 --callers 18 --users 100
  run "$version-three-u100x18" "$bin" 3 2.5 --callers 18 --users 100
  run "$version-one-hot16" "$bin" 1 2.5 --workload hot --callers 16
  run "$version-one-hot64" "$bin" 1 2.5 --workload hot --callers 64
  run "$version-one-hot18-loopback" "$bin" 1 0 --workload hot --callers 18
done
rm -rf "$work"; echo done
