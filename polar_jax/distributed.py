"""Joining the other processes of a multi-process run (JAX's own runtime) before any device is
touched, so that one mesh spans every process's devices (`models.sharding.make_mesh`)."""

from __future__ import annotations

import os

import jax

from polar_jax import validate
from polar_jax.errors import PolarJaxError

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


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize` from the arguments, else from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID; nothing when neither names a coordinator. CPU
    devices exchange data through gloo."""
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
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except Exception as err:  # the runtime's errors span lines
        reason = " ".join(str(err).split())[:300]
        raise PolarJaxError(f"cannot join {coordinator} as process {process_id} of "
                            f"{num_processes}: {reason}") from None
