#!/bin/bash
# Issue 19's measurement: one and three coordinators (without and with account affinity) at a
# 0 ms and a 5 ms (2.5 ms each way) storage round trip, by bench/scale-out.sh:
#   bench/measure.sh [OUTPUT_DIR]
set -u
out=${1:-bench-results-measure}
LATENCY_MS=0 ROUNDS=${ROUNDS:-1} "$(dirname "$0")/scale-out.sh" "$out/loopback"
LATENCY_MS=2.5 ROUNDS=${ROUNDS:-1} "$(dirname "$0")/scale-out.sh" "$out/5ms"
