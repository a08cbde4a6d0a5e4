"""Reading profiler traces: the kernels a jitted program ran on the device, and where in the
model each came from.

`kernel_events` lists one device's kernels, memsets and copies from a `jax.profiler` trace
(CUPTI on a GPU; the CPU client's thunks on a CPU). `scope_breakdown` sums their time by the
innermost `jax.named_scope` of the HLO instruction that launched them, read from the compiled
program's metadata: the model's blocks name their parts (`norm`, `qkv_proj`, `attention`, ...),
so a decode step's time splits into those parts without changing what runs. Collectives of a
program split over a mesh (XLA's all-reduces, NCCL's kernels) are parts of their own, whatever
scope their instruction inherited.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import re
import shutil
import tempfile

import jax

from models import scopes

# Kernels outside all of `scopes.ALL` (embedding, residual adds, sampling, loop control) count
# as "other"; cuBLAS GEMMs, which XLA runs without an HLO name, as "library_gemm" (the
# projections or MLP matmuls XLA gave to cuBLAS rather than Triton).
OTHER = "other"
LIBRARY_GEMM = "library_gemm"
ROUTER_TOPK = "router_topk"  # the top-k kernel of either router, where its HLO name is lost
ALL_REDUCE = "all_reduce"
COLLECTIVE = "collective"  # any other: all-gather, reduce-scatter, permute, all-to-all
# Collectives, by an HLO instruction's opcode or name (`all-reduce`, `all-reduce-start`; a
# `psum` is an `all-reduce`), or where no instruction is known by a kernel's name (NCCL's
# `ncclDevKernel_AllReduce_Sum_bf16_RING_LL`).
COLLECTIVES = ((re.compile(r"all[-_]?reduce", re.IGNORECASE), ALL_REDUCE),
               (re.compile(r"^nccl|all[-_]?gather|reduce[-_]?scatter|collective[-_]?permute|"
                           r"all[-_]?to[-_]?all", re.IGNORECASE), COLLECTIVE))
# Kernels whose names are not HLO names, by the prefix of their own names: the Pallas kernels,
# and library GEMMs (cuBLAS, run inside XLA's CUDA graphs, carry no HLO name at all).
KERNEL_PREFIXES = (("sparse_decode_attention", scopes.ATTENTION), ("selective_mlp", scopes.MLP),
                   ("neuron_scores", scopes.MLP_ROUTER), ("topk_indices", ROUTER_TOPK),
                   ("write_kv_token", scopes.KV_WRITE), ("nvjet", LIBRARY_GEMM),
                   ("sm90_xmma", LIBRARY_GEMM), ("cutlass", LIBRARY_GEMM))

_CONTROL_FLOW = re.compile(r"^(while|conditional|call)(\.\d+)?$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\(.*?\)|\S+) ([\w\-]+)\(")
_OP_NAME = re.compile(r'metadata=\{[^}]*op_name="([^"]*)"')


@contextlib.contextmanager
def tracing():
    """`with tracing() as events:` profiles the block; afterwards `events()` returns
    `kernel_events` of the trace (and the trace is deleted)."""
    path = tempfile.mkdtemp(prefix="pj_trace_")
    found: list = []
    try:
        jax.profiler.start_trace(path)
        try:
            yield lambda: found
        finally:
            jax.profiler.stop_trace()
        found.extend(kernel_events(path))
    finally:
        shutil.rmtree(path, ignore_errors=True)


def kernel_events(trace_dir, info: dict | None = None,
                  device: int = 0) -> list[tuple[float, float, str, str]]:
    """(start_ns, end_ns, kernel name, hlo_op) of the work of local device `device` in a trace
    (GPU kernels, memsets and copies; on a CPU, the XLA client's thunks); every device of a
    mesh runs the same program, so one device's time is a step's. `info`, if given, receives
    each line's event count: what the trace holds."""
    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return []
    events = set()
    for plane in ProfileData.from_file(files[0]).planes:
        gpu = plane.name.startswith("/device:GPU")
        if plane.name != (f"/device:GPU:{device}" if gpu else "/host:CPU"):
            continue
        for line in plane.lines:
            lname = line.name.lower()
            if gpu and ("xla" in lname or "step" in lname or "launch" in lname or "source" in lname):
                continue  # derived / aggregated lines, not the streams
            if not gpu and not lname.startswith("tf_xla"):
                continue  # the CPU client's and its thread pool's lines run the thunks
            evs = list(line.events)
            if info is not None:
                info[f"{plane.name} | {line.name}"] = len(evs)
            for e in evs:
                if e.duration_ns <= 0:
                    continue
                stats = dict(e.stats)
                # On a CPU: thread-pool bookkeeping, a loop or call around other thunks, or
                # another device's thunk.
                if not gpu and ("hlo_op" not in stats or _CONTROL_FLOW.match(e.name)
                                or stats.get("device_ordinal", device) != device):
                    continue
                events.add((float(e.start_ns), float(e.start_ns + e.duration_ns), e.name,
                            str(stats.get("hlo_op", ""))))
    return sorted(events)


def busy_ns(events) -> float:
    """The union of the events' intervals (time the device was doing something)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e, *_ in events:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _collective(text: str) -> str | None:
    return next((part for pattern, part in COLLECTIVES if pattern.search(text)), None)


def hlo_scopes(hlo_text: str) -> dict[str, str]:
    """Instruction name (also in its kernel-name spelling, `.` and `-` as `_`) -> its part, for
    the instructions of a compiled HLO module's text: a collective's (`COLLECTIVES`), else the
    innermost of `scopes.ALL` in its `op_name` (instructions with neither are left out)."""
    out = {}
    for line in hlo_text.splitlines():
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        name, opcode = instruction.groups()
        op_name = _OP_NAME.search(line)
        scope = _collective(opcode) or _collective(name)
        if scope is None and op_name:
            parts = op_name.group(1).split("/")
            scope = next((p for p in reversed(parts) if p in scopes.ALL), OTHER)
        if scope is not None:
            out[name] = scope
            out[re.sub(r"[.\-]", "_", name)] = scope
    return out


def _scope_of(name: str, hlo_op: str, by_instruction: dict[str, str]) -> str:
    for key in (hlo_op, name, re.sub(r"[.\-]", "_", name)):
        if key and key in by_instruction:
            return by_instruction[key]
    return _collective(name) or next(
        (scope for prefix, scope in KERNEL_PREFIXES if name.startswith(prefix)), OTHER)


def scope_breakdown(events, hlo_text: str, per: float) -> dict:
    """Device time of `events` by scope (collectives as `ALL_REDUCE` and `COLLECTIVE`), in
    microseconds divided by `per` (e.g. steps x layers), plus "gaps" (the span not covered by
    any event) and the ten costliest kernels."""
    by_instruction = hlo_scopes(hlo_text)
    by_scope: dict[str, float] = collections.Counter()
    by_kernel: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for s, e, name, hlo_op in events:
        scope = _scope_of(name, hlo_op, by_instruction)
        by_scope[scope] += e - s
        entry = by_kernel[(scope, name[:60])]
        entry[0] += e - s
        entry[1] += 1
    us = lambda ns: round(ns / 1e3 / per, 2)
    span = (events[-1][1] - events[0][0]) if events else 0.0
    parts = {k: us(v) for k, v in sorted(by_scope.items(), key=lambda kv: -kv[1])}
    parts["gaps"] = us(span - busy_ns(events))
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:10]
    return {"span": us(span), "parts": parts,
            "top_kernels": [dict(scope=scope, kernel=name, us=us(t), calls=round(c / per, 2))
                            for (scope, name), (t, c) in top]}
