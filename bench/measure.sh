#!/usr/bin/env bash
# The runs of docs/performance.md, by hand: release binaries, 15 s each, one after the other.
#   cargo build --release -p lockstep-bench -p lockstep-coordinator --bin lockstep-bench --bin coordinator
#   bench/measure.sh [OUTPUT_DIR]
#   LOCKSTEP_BENCH_DURATION=15 LOCKSTEP_COORDINATOR_FLAGS="--known-accounts false" bench/measure.sh before
# Writes one JSON object per run, an SVG per run and the coordinators' peak RSS into OUTPUT_DIR.
set -euo pipefail

bin="${LOCKSTEP_BIN:-${CARGO_TARGET_DIR:-target}/release}"
out="${1:-bench-results}"
duration="${LOCKSTEP_BENCH_DURATION:-15}"
mkdir -p "$out"
work="$(mktemp -d)"
pids=()
loads=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Daily limits raised to the maximum: a hot user deposits far more than $10,000 in 15 s (and a
# payer of the transfer runs may send more than $5,000).
# LOCKSTEP_COORDINATOR_FLAGS adds flags to every coordinator (e.g. "--known-accounts false").
# shellcheck disable=SC2206 # split on purpose: a list of flags
limits=(--daily-deposit-limit 1000000 --daily-withdrawal-limit 1000000 --daily-transfer-limit 1000000 ${LOCKSTEP_COORDINATOR_FLAGS:-})
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1

wait_for_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    return 1
}

peak_rss() { # pid name
    echo "$2 $(grep VmHWM "/proc/$1/status")" | tee -a "$out/peak-rss.txt"
}

run() { # name, flags...
    local name="$1"
    shift
    echo "== $name: lockstep-bench $* ($(uptime))" | tee -a "$out/commands.txt"
    "$bin/lockstep-bench" --quiet --duration "$duration" --svg "$out/$name.svg" --json "$@" >"$out/$name.json"
}

# 1. Lockstep and the baseline side by side on one dynoxide HTTP server (file-backed). Each
# comparison gets a fresh server, so no run pays for the items an earlier one left (a larger
# SQLite file is slower); within a pair the baseline runs first, so Lockstep is the one that finds
# the other's items.
dynoxide_port=8000
fresh_dynoxide() { # file name
    if [[ -n "${dynoxide:-}" ]]; then kill "$dynoxide"; wait "$dynoxide" || true; fi
    dynoxide_port=$((dynoxide_port + 1))
    "$bin/lockstep-bench" serve-dynoxide --listen "127.0.0.1:$dynoxide_port" --file "$work/$1.sqlite3" &
    dynoxide=$!
    pids+=("$dynoxide")
    wait_for_port "$dynoxide_port"
    endpoint="http://127.0.0.1:$dynoxide_port"
    "$bin/coordinator" --dynamodb-endpoint "$endpoint" create-tables
}

endpoint_pair() { # name, coordinator flags (one word), bench flags...
    local name="$1" flags="$2"
    shift 2
    fresh_dynoxide "$name"
    # shellcheck disable=SC2086 # flags split on purpose
    "$bin/coordinator" --dynamodb-endpoint "$endpoint" --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:9464 $flags "${limits[@]}" 2>"$out/coordinator-$name.log" &
    coordinator=$!
    pids+=("$coordinator")
    wait_for_port 50051
    run "$name" --systems baseline,lockstep --dynamodb-endpoint "$endpoint" --metrics-url http://127.0.0.1:9464/metrics "$@"
    peak_rss "$coordinator" "coordinator on the dynoxide HTTP server ($name):"
    kill "$coordinator"
    wait "$coordinator" || true
}

endpoint_pair endpoint-uniform-16x100 "" --callers 16 --users 100
endpoint_pair endpoint-hot-16x1 "" --callers 16 --workload hot
# Group commit is off by default for an endpoint; a single-node DynamoDB-compatible server
# serializes every transaction like the embedded engine, where it pays.
endpoint_pair endpoint-group-commit-uniform-16x100 "--group-commit on" --callers 16 --users 100

# 1b. Three coordinators on one endpoint (a fresh one), one hot user shared by three loads at once.
fresh_dynoxide three-coordinators
three=()
for index in 1 2 3; do
    "$bin/coordinator" --dynamodb-endpoint "$endpoint" --listen "127.0.0.1:5007$index" \
        --metrics-listen "127.0.0.1:947$index" --instance "bench-$index" "${limits[@]}" 2>"$out/coordinator-three-$index.log" &
    three+=($!)
    pids+=($!)
done
for index in 1 2 3; do wait_for_port "5007$index"; done
echo "== endpoint-hot-3-coordinators ($(uptime))" | tee -a "$out/commands.txt"
prefix="three-$RANDOM"
for index in 1 2 3; do
    "$bin/lockstep-bench" --quiet --duration "$duration" --json --target "http://127.0.0.1:5007$index" \
        --metrics-url "http://127.0.0.1:947$index/metrics" --workload hot --callers 6 --user-prefix "$prefix" \
        >"$out/endpoint-hot-3-coordinators-$index.json" &
    loads+=($!)
done
wait "${loads[@]}"
for pid in "${three[@]}"; do peak_rss "$pid" "coordinator of three:"; kill "$pid"; wait "$pid" || true; done

# 2. The embedded default.
"$bin/coordinator" --data-dir "$work/lockstep-data" --listen 127.0.0.1:50052 --metrics-listen 127.0.0.1:9465 "${limits[@]}" 2>"$out/coordinator-embedded.log" &
coordinator=$!
pids+=("$coordinator")
wait_for_port 50052
embedded=(--target http://127.0.0.1:50052 --metrics-url http://127.0.0.1:9465/metrics)
run embedded-uniform-16x100 "${embedded[@]}" --callers 16 --users 100
run embedded-uniform-64x1000 "${embedded[@]}" --callers 64 --users 1000
run embedded-hot-16x1 "${embedded[@]}" --callers 16 --workload hot
run embedded-design "${embedded[@]}" --workload design
# Transfers against deposits on the same users and callers (docs/performance.md, Transfers).
run embedded-deposit-16x100 "${embedded[@]}" --callers 16 --users 100 --withdraw-weight 0 --buy-weight 0
run embedded-transfer-16x100 "${embedded[@]}" --callers 16 --users 100 --workload transfer
run embedded-hot-receiver-16x100 "${embedded[@]}" --callers 16 --users 100 --workload hot-receiver
peak_rss "$coordinator" "coordinator embedded:"
kill "$coordinator"
wait "$coordinator" || true

# 3. The embedded engine without group commit, for the comparison in docs/engines.md.
"$bin/coordinator" --data-dir "$work/lockstep-data-solo" --listen 127.0.0.1:50053 --metrics-listen 127.0.0.1:9466 --group-commit off "${limits[@]}" 2>"$out/coordinator-embedded-solo.log" &
coordinator=$!
pids+=("$coordinator")
wait_for_port 50053
solo=(--target http://127.0.0.1:50053 --metrics-url http://127.0.0.1:9466/metrics)
run embedded-no-group-commit-uniform-16x100 "${solo[@]}" --callers 16 --users 100
run embedded-no-group-commit-uniform-64x1000 "${solo[@]}" --callers 64 --users 1000
peak_rss "$coordinator" "coordinator embedded without group commit:"
kill "$coordinator"
wait "$coordinator" || true
echo "results in $out"
