"""Several processes as one mesh, on one host over loopback: two `polar-jax generate`
processes of four CPU devices each (gloo between them) decode greedily what one process on one
device decodes, from the fixture's converted copy (orbax restores each process's shards);
process 1 prints nothing on stdout. And the multi-process options' one-line
refusals, made before JAX joins anything."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from conftest import fixture_path, run_cli
from convert import convert_checkpoint
from polar_jax.cli import main
from polar_jax.distributed import ENV

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ("--prompt", "The history of", "--prompt", "Once upon a time there", "--prompt", "A",
            "--max-new-tokens", 8, "--dtype", "float32", "--json", "--quiet")
TIMEOUT_S = 240  # both processes together, compiles included


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path: Path, argv) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of `polar-jax ARGV` run as processes 0 and 1 of two, with
    four CPU devices each, joined through a coordinator on 127.0.0.1; killed past TIMEOUT_S."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    for name in ENV.values():
        env.pop(name, None)
    procs, logs = [], []
    try:
        for i in range(2):
            logs.append((tmp_path / f"stdout{i}", tmp_path / f"stderr{i}"))
            with open(logs[-1][0], "w") as out, open(logs[-1][1], "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "polar_jax.cli", *map(str, argv), "--coordinator",
                     f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                    stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=ROOT))
        deadline = time.monotonic() + TIMEOUT_S
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(rc, out.read_text(), err.read_text()) for rc, (out, err) in zip(codes, logs)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The tiny OPT fixture as Hugging Face stores it and converted (orbax params)."""
    hf = fixture_path("fixtures", "tiny-opt")
    return {"hf": hf, "converted": convert_checkpoint(
        str(hf), str(tmp_path_factory.mktemp("multiprocess") / "tiny-opt"))}


@pytest.fixture(scope="module")
def one_device_tokens(models) -> list[list[int]]:
    """Greedy tokens per prompt of one process on one device (this one, in-process)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["generate", "--model", str(models["hf"]), *map(str, GENERATE)]) == 0
    return [json.loads(line)["tokens"] for line in buffer.getvalue().splitlines()[:-1]]


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="compares CPU processes with this process's device 0 on CPU")
def test_two_processes_decode_as_one_device(tmp_path, models, one_device_tokens):
    """tp 4 x dp 2 over two processes, from the converted copy (each process restores only its
    shards). One case: each costs two processes' imports and compiles (~25 CPU-seconds)."""
    tp, dp = 4, 2
    (rc0, out0, err0), (rc1, out1, err1) = _two_processes(
        tmp_path, ["generate", "--model", models["converted"], *GENERATE, "--tp", tp, "--dp", dp])
    assert (rc0, rc1) == (0, 0), f"process 0: {err0[-3000:]}\nprocess 1: {err1[-3000:]}"
    assert out1 == ""
    lines = [json.loads(line) for line in out0.splitlines()]  # stdout holds only JSON
    assert [line["tokens"] for line in lines[:-1]] == one_device_tokens
    assert len(one_device_tokens) == 3 and all(len(t) == 8 for t in one_device_tokens)
    assert (lines[-1]["tp"], lines[-1]["dp"]) == (tp, dp)


def test_a_coordinator_that_never_answers_is_one_line(capsys, monkeypatch):
    """Process 1 waits --coordinator-timeout seconds for process 0, then names the address."""
    joined = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kw: joined.append(args))
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    start = time.monotonic()
    rc, out, err = run_cli(capsys, ["generate", "--model", "/nonexistent", "--prompt", "A",
                                    "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                                    "--process-id", 1, "--coordinator-timeout", 1.5])
    assert (rc, out, joined) == (2, "", [])
    assert 1.5 <= time.monotonic() - start < 10
    assert err.startswith(f"polar-jax: error: the coordinator 127.0.0.1:{port} did not answer "
                          "within 1.5 s (--coordinator-timeout; last: Connection refused)")
    assert err.count("\n") == 1


@pytest.mark.parametrize("options, env, message", [
    (("--coordinator", "127.0.0.1:1234", "--num-processes", 2, "--process-id", 2), {},
     "--process-id must be an integer in [0, 1], got 2"),
    (("--coordinator", "nonsense", "--num-processes", 2, "--process-id", 0), {},
     "--coordinator must be HOST:PORT (a port in 1-65535), got 'nonsense'"),
    (("--coordinator", "127.0.0.1:0"), {}, "--coordinator must be HOST:PORT"),
    (("--num-processes", 2), {}, "--num-processes and --process-id need --coordinator HOST:PORT"),
    (("--process-id", 0), {}, "need --coordinator"),
    (("--coordinator", "127.0.0.1:1234", "--process-id", 0), {},
     "not --num-processes (nor JAX_NUM_PROCESSES)"),
    ((), {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "two",
          "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be an integer, got 'two'"),
    ((), {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
          "JAX_PROCESS_ID": "5"}, "--process-id must be an integer in [0, 1], got 5"),
])
def test_process_options_refused_in_one_line(capsys, monkeypatch, options, env, message):
    joined = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kw: joined.append(args))
    for name in ENV.values():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rc, out, err = run_cli(capsys, ["generate", "--model", fixture_path("fixtures", "tiny-opt"),
                                    "--prompt", "A", *options])
    assert (rc, out, joined) == (2, "", [])
    assert err.startswith("polar-jax: error: ") and err.count("\n") == 1
    assert message in err
