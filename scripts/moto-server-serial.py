#!/usr/bin/env python3
"""moto_server, but serving one request at a time (werkzeug threaded=False).

Stock `moto_server` runs werkzeug with threaded=True, and moto's DynamoDB
backend has no per-table lock, so concurrent conditional writes
(UpdateItem / TransactWriteItems with ConditionExpression) can both succeed.
Serializing requests makes every DynamoDB call atomic, like real DynamoDB's
per-item conditional writes. Same CLI as moto_server (-H HOST -p PORT; -p 0
picks a free port, printed to stderr as ' * Running on http://HOST:PORT').
Run with the venv's python: .venv/bin/python scripts/moto-server-serial.py
"""
import functools
import os
import threading
import time

import moto.server


def _exit_with_parent():
    """Test harnesses cannot always kill what they start (a panicking test binary, kill -9):
    when LOCKSTEP_EXIT_WITH_PARENT is set, exit as soon as the parent process is gone."""
    parent = os.getppid()
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


if os.environ.get("LOCKSTEP_EXIT_WITH_PARENT"):
    threading.Thread(target=_exit_with_parent, daemon=True).start()

_orig_run_simple = moto.server.run_simple


@functools.wraps(_orig_run_simple)
def _serial_run_simple(*args, **kwargs):
    kwargs["threaded"] = False
    return _orig_run_simple(*args, **kwargs)


moto.server.run_simple = _serial_run_simple

if __name__ == "__main__":
    moto.server.main()
