"""Timing shared by the benchmarks: calls unrolled in one jit timed from a profiler trace, the
median of repeats of a host-timed run, and the device's copy bandwidth.

`time_calls` (`bench kernels`): N calls unrolled inside one jitted function (straight-line, so
no host round trip between calls); GPU time from a profiler trace (CUPTI), the median over
repeats, divided by N; where no trace can be read, the host wall clock less the cost of
dispatching an empty function with the same arguments. `per_step_ms` (`bench decode`): a loop
of N steps timed as `(t(2N) - t(N)) / N`, so dispatch and the first call's compilation cancel.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp

from polar_jax.bench import torch_peer
from polar_jax.bench.trace import busy_ns, kernel_events

L2_BYTES = 64 << 20  # a bit above the H100's 50 MB / H200's 60 MB L2
ROTATION_BYTES = 3 * L2_BYTES  # inputs rotate over this much, so they are never cache-resident
COPY_BYTES = 1 << 30  # the copy-bandwidth buffer on a GPU
COPY_BYTES_CPU = 1 << 22
COPY_CALLS = 10
# For choosing how many calls to unroll (not for reporting): roughly an H100/H200.
EST_BANDWIDTH = 2.8e12  # bytes/s
EST_FLOPS = 4e14  # fp16 tensor-core FLOP/s
LAUNCH_MS = 0.004  # a kernel launch inside a jitted program


def estimate_ms(nbytes: float, flops: float = 0.0, launch_ms: float = LAUNCH_MS) -> float:
    """A rough device time of reading `nbytes` and computing `flops`, in ms."""
    return nbytes / EST_BANDWIDTH * 1e3 + launch_ms + flops / EST_FLOPS * 1e3


def n_calls(est_ms: float, target_ms: float, lo: int = 8, hi: int = 50) -> int:
    """How many calls of about `est_ms` make about `target_ms` of device time, in [lo, hi]."""
    return int(min(hi, max(lo, round(target_ms / max(est_ms, 1e-4)))))


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The median over `repeats` of the host time of `fn()` (which must block on its result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_step_ms(run_steps: Callable[[int], float], steps: int, repeats: int) -> float:
    """ms per step: the median over `repeats` of `(run_steps(2 steps) - run_steps(steps)) /
    steps`, where `run_steps(n)` runs n steps and returns its seconds; a first run of `steps`
    compiles and warms up."""
    run_steps(steps)
    per_step = [(run_steps(2 * steps) - run_steps(steps)) / steps for _ in range(repeats)]
    return statistics.median(per_step) * 1e3


def _split_reps(events, reps):
    """The events of each timed repeat: cut at the reps-1 largest idle gaps (host syncs)."""
    if len(events) < reps:
        return None
    gaps = []
    end = events[0][1]
    for i in range(1, len(events)):
        gaps.append((events[i][0] - end, i))
        end = max(end, events[i][1])
    cuts = sorted(i for _, i in sorted(gaps, reverse=True)[:reps - 1])
    out, prev = [], 0
    for c in cuts + [len(events)]:
        out.append(events[prev:c])
        prev = c
    return out


def time_calls(fn, calls, reps, debug=False) -> dict:
    """ms per call of `fn(*c) for c in calls`, unrolled inside one jit.

    Primary: GPU time from a profiler trace (CUPTI), per repeat the span from the first kernel
    start to the last kernel end (launch gaps between our kernels included, host dispatch and
    sync excluded) divided by the number of calls; median over repeats. `kernel_ms` is the busy
    time (union of kernel intervals) per call. Fallback where no trace can be read: host wall
    clock minus the dispatch cost of an empty function with the same arguments.
    """
    f = jax.jit(lambda cs: [fn(*c) for c in cs])
    t0 = time.perf_counter()
    jax.block_until_ready(f(calls))
    compile_s = time.perf_counter() - t0
    n = len(calls)
    res = dict(n_calls=n, reps=reps, compile_s=round(compile_s, 2))
    if jax.default_backend() == "gpu":
        d = tempfile.mkdtemp(prefix="pj_trace_")
        try:
            jax.profiler.start_trace(d)
            try:
                for _ in range(reps):
                    jax.block_until_ready(f(calls))
            finally:
                jax.profiler.stop_trace()
            info = {} if debug else None
            groups = _split_reps(kernel_events(d, info), reps)
            if debug:
                res["trace_info"] = info
        except Exception as err:  # no profiler: fall back to the wall clock
            groups = None
            res["trace_error"] = f"{type(err).__name__}: {err}"[:200]
        finally:
            shutil.rmtree(d, ignore_errors=True)
        if groups and all(groups):
            spans = [max(ev[1] for ev in g) - g[0][0] for g in groups]
            spans = [x / n * 1e-6 for x in spans]
            busy = [busy_ns(g) / n * 1e-6 for g in groups]
            res.update(ms=statistics.median(spans), ms_min=min(spans), ms_max=max(spans),
                       kernel_ms=statistics.median(busy), timing="device-trace",
                       events_per_call=round(sum(len(g) for g in groups) / (reps * n), 2))
            return res
    empty = jax.jit(lambda cs: [c[-1] for c in cs[:1]])
    jax.block_until_ready(empty(calls))
    overhead = median_seconds(lambda: jax.block_until_ready(empty(calls)), max(3, reps))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(calls))
        ts.append(time.perf_counter() - t0)
    per = [max(t - overhead, 1e-9) / n * 1e3 for t in ts]
    res.update(ms=statistics.median(per), ms_min=min(per), ms_max=max(per),
               overhead_ms=overhead * 1e3, timing="wall-clock")
    return res


def copy_bandwidth_jax(reps: int, nbytes: int) -> tuple[dict, dict]:
    """(copy, read) timings of an elementwise fp16 copy and a float32 reduce of `nbytes`, each
    with its "tbps" (copy: bytes read + written)."""
    numel = nbytes // 2
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    xs = [jax.random.normal(k_, (numel,), jnp.float16) for k_ in keys]
    calls = [(xs[i % 2], jnp.float16(1 + (i % 7) / 64)) for i in range(COPY_CALLS)]
    copy = time_calls(lambda x, c: x * c, calls, reps)
    copy["tbps"] = 2 * nbytes / (copy["ms"] * 1e-3) / 1e12
    read = time_calls(lambda x, c: jnp.sum(x.astype(jnp.float32)) * c, calls, reps)
    read["tbps"] = nbytes / (read["ms"] * 1e-3) / 1e12
    del xs, calls
    return copy, read


def copy_case() -> dict:
    """The torch peer's copy-bandwidth case (`torch_peer.kernel_baselines`)."""
    return dict(kind="copy", bytes=COPY_BYTES, n_calls=COPY_CALLS)


def copy_bandwidth(reps: int = 5) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second): the faster of the JAX
    copy (`copy_bandwidth_jax`) and, on a GPU where torch sees CUDA, the torch peer's copy in a
    CUDA graph; call it before the benchmark's big arrays are allocated."""
    gpu = jax.default_backend() == "gpu"
    torch_tbps = 0.0
    if gpu and torch_peer.cuda_available():
        peer = torch_peer.run("kernels", torch_peer.KERNELS_TIMEOUT_S, cases=[copy_case()],
                              reps=reps, rotation_bytes=ROTATION_BYTES)
        torch_tbps = next((c.get("tbps") or 0.0 for c in peer.get("cases", [])
                           if c.get("kind") == "copy"), 0.0)
    jax_copy, _ = copy_bandwidth_jax(reps if gpu else 1, COPY_BYTES if gpu else COPY_BYTES_CPU)
    return max(jax_copy["tbps"], torch_tbps) * 1e12
