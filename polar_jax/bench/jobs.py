"""A job in a process of its own: `python -m MODULE` reads it from stdin as JSON and prints its
result as one marked JSON line (`reply`); `run` starts it and reads the result back. The
benchmarks use it to keep torch away from JAX's process and device memory (`torch_peer`), and
to compile each program in a fresh process (`compile`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MARKER = "@@JOB_RESULT@@"
ERROR_CHARS = 2000  # of the job's traceback kept in a result's "error"


def run(module: str, payload: dict, timeout: float) -> dict:
    """The result `python -m module` replies to `payload`, or {"error": ...}."""
    root = str(Path(__file__).resolve().parents[2])  # where `polar_jax` imports from
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run([sys.executable, "-m", module], text=True, capture_output=True,
                              input=json.dumps(payload), timeout=timeout,
                              env=dict(os.environ, PYTHONPATH=path))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    # The Python traceback, not the repeated device-side assertion lines before it.
    lines = [ln for ln in (done.stderr or done.stdout).splitlines() if "Assertion `" not in ln]
    return {"error": "\n".join(lines)[-ERROR_CHARS:]}


def reply(result: dict) -> None:
    """The job's side: print `result` for `run`."""
    print(MARKER + json.dumps(result), flush=True)
