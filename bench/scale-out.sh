#!/bin/bash
# Issue 19's main figure (docs/scale-out.md, docs/performance.md): one coordinator against three
# on the same table, without and with account affinity (--advertise-address), one binary, at a
# 5 ms storage round trip (dynoxide's HTTP server 2.5 ms away each way), 15 s a run, rounds
# alternating so that the machine's drift falls on every configuration alike:
#   bench/scale-out.sh [OUTPUT_DIR]        (ROUNDS=2 LATENCY_MS=2.5 by default)
set -u
BIN=${BIN:-target/release/coordinator}; BENCH=${BENCH:-target/release/lockstep-bench}
ROUNDS=${ROUNDS:-2}; LATENCY_MS=${LATENCY_MS:-2.5}
out=${1:-bench-results-scale-out}; mkdir -p "$out"; work=$(mktemp -d)
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1
limits=(--daily-deposit-limit 1000000 --daily-withdrawal-limit 1000000 --daily-transfer-limit 1000000)
port=8300; cport=50400
wait_for_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on $1" >&2; return 1; }
run() { # label coordinators affinity(yes|no) bench-args...
  local label=$1 count=$2 affinity=$3; shift 3
  port=$((port+1))
  "$BENCH" serve-dynoxide --listen 127.0.0.1:$port --file "$work/$label.sqlite3" --latency-ms "$LATENCY_MS" >/dev/null &
  local dyn=$!
  wait_for_port $port
  "$BIN" --dynamodb-endpoint http://127.0.0.1:$port create-tables >/dev/null 2>&1
  local pids=() targets=()
  for index in $(seq "$count"); do
    cport=$((cport+1))
    local extra=()
    [ "$affinity" = yes ] && extra=(--advertise-address "http://127.0.0.1:$cport")
    RUST_LOG=warn "$BIN" --dynamodb-endpoint http://127.0.0.1:$port --listen 127.0.0.1:$cport --instance "so-$index" \
      "${limits[@]}" "${extra[@]}" 2>"$out/$label-$index.log" &
    pids+=($!); targets+=("http://127.0.0.1:$cport")
  done
  for t in "${targets[@]}"; do wait_for_port "${t##*:}"; done
  # Affinity: every coordinator must have read the others' announcements (two listings).
  [ "$affinity" = yes ] && sleep 1.5
  local joined; joined=$(IFS=,; echo "${targets[*]}")
  echo "== $label: $count coordinator(s), affinity $affinity, ${LATENCY_MS} ms each way, $* ($(uptime))" | tee -a "$out/commands.txt"
  "$BENCH" --quiet --json --duration 15 --targets "$joined" "$@" >"$out/$label.json"
  for pid in "${pids[@]}"; do kill -INT "$pid"; wait "$pid"; done
  kill "$dyn"; wait "$dyn" 2>/dev/null
}
for round in $(seq "$ROUNDS"); do
  for workload in "hot18:--workload hot --callers 18" "u100x18:--callers 18 --users 100"; do
    name=${workload%%:*}; read -r -a args <<<"${workload#*:}"
    run "r$round-one-$name" 1 no "${args[@]}"
    run "r$round-three-$name" 3 no "${args[@]}"
    run "r$round-three-affinity-$name" 3 yes "${args[@]}"
  done
done
rm -rf "$work"; echo done
