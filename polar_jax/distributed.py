"""Joining the other processes of a multi-process run (JAX's own runtime) before any device is
touched, so that one mesh spans every process's devices (`models.sharding.make_mesh`)."""

from __future__ import annotations

import math
import os
import socket
import time

import jax

from polar_jax import validate
from polar_jax.errors import PolarJaxError

COORDINATOR_TIMEOUT_S = 300  # JAX's own initialization timeout
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def several_processes() -> bool:
    return jax.process_count() > 1


def _from_env(name: str) -> int:
    value = os.environ.get(ENV[name])
    if value is None:
        raise PolarJaxError(f"a coordinator is named but not --{name.replace('_', '-')} "
                            f"(nor {ENV[name]})")
    try:
        return int(value)
    except ValueError:
        raise PolarJaxError(f"{ENV[name]} must be an integer, got {value!r}") from None


def _await_coordinator(host: str, port: int, timeout: float) -> None:
    """Returns once host:port accepts a connection; refuses in one line naming it when nothing
    does within `timeout` seconds (JAX's runtime would abort the process with a C++ stack)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())
                                     ).close()
            return
        except OSError as err:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PolarJaxError(
                    f"the coordinator {host}:{port} did not answer within {timeout:g} s "
                    f"(--coordinator-timeout; last: {err.strerror or err}): start process 0 "
                    "first, or check the address") from None
            time.sleep(min(0.5, remaining))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: float = COORDINATOR_TIMEOUT_S) -> None:
    """`jax.distributed.initialize` from the arguments, else from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID; nothing when neither names a coordinator. CPU
    devices exchange data through gloo. A process other than 0 waits at most `timeout` seconds
    for the coordinator to answer; the runtime's own initialization gets as long."""
    coordinator = coordinator or os.environ.get(ENV["coordinator"])
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise PolarJaxError("--num-processes and --process-id need --coordinator HOST:PORT")
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PolarJaxError(f"--coordinator must be HOST:PORT (a port in 1-65535), got "
                            f"{coordinator!r}")
    num_processes = _from_env("num_processes") if num_processes is None else num_processes
    process_id = _from_env("process_id") if process_id is None else process_id
    validate.integer("--num-processes", num_processes, low=1)
    validate.integer("--process-id", process_id, low=0, high=num_processes - 1)
    validate.number("--coordinator-timeout", timeout, low=0, low_open=True)
    if process_id > 0:
        _await_coordinator(host, int(port), timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=max(1, math.ceil(timeout)))
    except Exception as err:  # the runtime's errors span lines
        reason = " ".join(str(err).split())[:300]
        raise PolarJaxError(f"cannot join {coordinator} as process {process_id} of "
                            f"{num_processes}: {reason}") from None
