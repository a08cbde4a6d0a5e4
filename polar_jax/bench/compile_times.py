"""`polar-jax bench compile`: how long each Pallas kernel, and the whole jitted decode-step
program, takes to compile at the real decode shapes, against the targets (each kernel under
20 s; the opt-6.7b sparse decode program under 60 s).

Each row lowers and compiles one jitted call on abstract inputs (`jax.ShapeDtypeStruct`s: no
weights or caches are allocated) with the persistent compilation cache off; its time is the
wall time of `.lower(...).compile()` (lowering and compilation also apart). Each row runs in a
fresh process (`polar_jax.bench.jobs`; `--in-process`: all in this one), after a warm-up
compile there (an XLA op and a tiny Pallas kernel) that takes the process's one-time setup,
so no row reuses another's compiled kernels or XLA's autotuning results. On the CPU the
kernels compile for the Pallas interpreter.

The rows (bfloat16 unless said):
- `topk_indices`: one row of 16384, 20480 (opt-13b MLP), 28672, 33000 and 36864 (opt-66b)
  scores at k = 0.62 N and 0.2 N (multiples of 128), and the attention router's 64 rows of 32
  float32 group logits at k = 10 (30%); each with the kernel's path (registers or chunks);
- `neuron_scores` (B 1 and 64, r 1024, N 16384), `selective_mlp` (B 1 and 64, d 4096,
  N 16384, k 10112, ReLU), `sparse_decode_attention` (B 64, Hq = Hkv = 32, S 2048, D 128,
  10 of 32 groups), `write_kv_token` (the same cache);
- `decode_sparse`: the decode loop `bench decode` times (`make_decode_loop`), opt-6.7b, batch
  64, context 2048, 30% of the KV groups, MLP k 0.62 N (its `--mlp-density 0.62` plan), random
  routers of rank 1024; `decode_dense`: its dense twin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from polar_jax import bench
from polar_jax.bench import jobs
from polar_jax.errors import PolarJaxError
from polar_jax.validate import cli_type, integer

KERNEL_TARGET_S = 20.0
PROGRAM_TARGET_S = 60.0  # the sparse decode program (its dense twin is shown, not judged)
ROW_TIMEOUT_S = 600
DECODE_STEPS = 16  # `bench decode`'s default: its cache holds the context plus 2 x steps


def _sds(shape, dtype="bfloat16"):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _topk(R, N, k, dtype, chunk=None):
    from pallas_kernels import topk_indices

    return jax.jit(lambda s: topk_indices(s, k, chunk=chunk)), (_sds((R, N), dtype),)


def _neuron_scores(B, r, N, dtype):
    from pallas_kernels import neuron_scores
    from pallas_kernels.selection import TIE_BREAK

    fn = jax.jit(lambda h, w_up, active: neuron_scores(h, w_up, active, tie_break=TIE_BREAK))
    return fn, (_sds((B, r), dtype), _sds((N, r), dtype), _sds((B,), bool))


def _selective_mlp(B, d, N, k, dtype):
    from pallas_kernels import selective_mlp

    fn = jax.jit(lambda x, w_in, b_in, w_out, b_out, idx: selective_mlp(
        x, w_in, b_in, w_out, b_out, idx, activation="relu"))
    return fn, (_sds((B, d), dtype), _sds((N, d), dtype), _sds((N,), dtype),
                _sds((N, d), dtype), _sds((d,), dtype), _sds((k,), jnp.int32))


def _skinny_matmul(M, K, N, layout, dtype):
    from pallas_kernels.skinny_matmul import skinny_matmul

    w = (K, N) if layout == "kn" else (N, K)
    return (jax.jit(lambda x, w: skinny_matmul(x, w, layout=layout)),
            (_sds((M, K), dtype), _sds(w, dtype)))


def _attention(B, Hq, Hkv, S, D, k, dtype):
    from pallas_kernels import sparse_decode_attention

    cache = _sds((B, Hkv, S, D), dtype)
    return jax.jit(sparse_decode_attention), (_sds((B, Hq, D), dtype), cache, cache,
                                              _sds((B,), jnp.int32), _sds((B, k), jnp.int32))


def _write_kv(B, H, S, D, dtype):
    from pallas_kernels import write_kv_token

    cache, new = _sds((B, H, S, D), dtype), _sds((B, H, D), dtype)
    # Donated, as in a decode step: the caches are written in place.
    return (jax.jit(write_kv_token, donate_argnums=(0, 1)),
            (cache, cache, new, new, _sds((B,), jnp.int32)))


def _decode(arch, batch, context, attn_topk=None, mlp_density=None, dtype="bfloat16"):
    """`bench decode`'s loop of `arch` (sparse with `attn_topk`, else dense) on abstract
    weights, routers and cache."""
    from flax import nnx

    from models import build_model, config_from_hf
    from polar_jax.bench.decode import (RANDOM_ROUTER_RANK, arch_hf_config, kv_cache_abstract,
                                        make_decode_loop, sparse_plan)
    from polar_jax.decode import cache_length
    from routers.model import Routers

    positions = context + 2 * DECODE_STEPS + 1
    config = config_from_hf(arch_hf_config(arch, positions))
    dtype = jnp.dtype(dtype)
    graphdef, state = nnx.split(build_model(config, dtype))  # shapes only
    plan = routers = None
    if attn_topk is not None:
        plan = sparse_plan(config, attn_topk, batch, mlp_density=mlp_density)
        routers = jax.eval_shape(
            lambda: Routers.for_model(config, RANDOM_ROUTER_RANK, seed=1).unstack(dtype))
    tokens = _sds((batch,), jnp.int32)
    return make_decode_loop(graphdef, plan), (
        state, routers, kv_cache_abstract(config, batch, cache_length(positions), dtype),
        tokens, tokens, _sds((), jnp.int32))


BUILDERS = {"topk_indices": _topk, "neuron_scores": _neuron_scores,
            "selective_mlp": _selective_mlp, "skinny_matmul": _skinny_matmul,
            "sparse_decode_attention": _attention,
            "write_kv_token": _write_kv, "decode_sparse": _decode, "decode_dense": _decode}


def _k(fraction: float, N: int) -> int:
    """k = fraction x N in whole steps of `mlp_topk_step(N)` (as calibrated MLP k are)."""
    from pallas_kernels.selection import mlp_topk_step

    step = mlp_topk_step(N)
    return min(N, max(step, round(fraction * N / step) * step))


def plan_rows(quick: bool, only, topk_chunk: int | None) -> list[dict]:
    """The rows to compile: {"kernel", "args"} (and "path" for top-k), in table order."""
    from pallas_kernels.topk_select import row_chunk

    if quick:  # tiny shapes (a smoke test): a register row and one of four chunks of 64
        topk = [dict(R=1, N=100, k=_k(0.62, 100), dtype="bfloat16"),
                dict(R=1, N=250, k=_k(0.2, 250), dtype="bfloat16", chunk=64),
                dict(R=4, N=4, k=1, dtype="float32")]
        B, r, d, N, S, H, D, arch, context = (1, 2), 16, 64, 256, 64, 4, 16, "tiny", 64
    else:
        topk = [dict(R=1, N=N, k=_k(f, N), dtype="bfloat16")
                for N in (16384, 20480, 28672, 33000, 36864) for f in (0.62, 0.2)]
        topk.append(dict(R=64, N=32, k=10, dtype="float32"))
        B, r, d, N, S, H, D, arch, context = (1, 64), 1024, 4096, 16384, 2048, 32, 128, \
            "opt-6.7b", 2048
    if topk_chunk:
        topk = [dict(a, chunk=topk_chunk) for a in topk]
    k_mlp = _k(0.62, N)
    rows = [dict(kernel="topk_indices", args=a) for a in topk]
    rows += [dict(kernel="neuron_scores", args=dict(B=b, r=r, N=N, dtype="bfloat16")) for b in B]
    rows += [dict(kernel="selective_mlp", args=dict(B=b, d=d, N=N, k=k_mlp, dtype="bfloat16"))
             for b in B]
    # The largest projection of a one-row decode step (Q/K/V) and the neuron-major MLP input.
    rows += [dict(kernel="skinny_matmul", args=dict(M=1, K=d, N=3 * d, layout="kn",
                                                    dtype="bfloat16")),
             dict(kernel="skinny_matmul", args=dict(M=1, K=d, N=N, layout="nk", dtype="bfloat16"))]
    kept = max(1, round(0.3 * H))
    rows.append(dict(kernel="sparse_decode_attention",
                     args=dict(B=B[-1], Hq=H, Hkv=H, S=S, D=D, k=kept, dtype="bfloat16")))
    rows.append(dict(kernel="write_kv_token", args=dict(B=B[-1], H=H, S=S, D=D, dtype="bfloat16")))
    program = dict(arch=arch, batch=B[-1], context=context)
    rows.append(dict(kernel="decode_sparse", args=dict(program, attn_topk=0.3, mlp_density=0.62)))
    rows.append(dict(kernel="decode_dense", args=program))
    rows = [row for row in rows if row["kernel"] in only]
    for row in rows:
        if row["kernel"] == "topk_indices":
            a = row["args"]
            C = row_chunk(a["N"], a.get("chunk"))
            row["path"] = "registers" if C >= a["N"] else f"chunks of {C}"
        row["target_s"] = {"decode_sparse": PROGRAM_TARGET_S, "decode_dense": None}.get(
            row["kernel"], KERNEL_TARGET_S)
    return rows


def _warm_up() -> None:
    """Compile an XLA op and a tiny Pallas kernel: the process's one-time setup (backend,
    compilers) is then charged to no row."""
    jax.config.update("jax_enable_compilation_cache", False)
    jax.jit(lambda x: x + 1).lower(_sds((8,), jnp.float32)).compile()
    fn, abstract = _write_kv(B=1, H=1, S=16, D=16, dtype="float32")
    fn.lower(*abstract).compile()


def compile_row(row: dict) -> dict:
    """{"lower_s", "compile_s", "seconds"} of `row`'s jitted call on its abstract inputs, or
    {"error": ...}."""
    try:
        fn, abstract = BUILDERS[row["kernel"]](**row["args"])
        start = time.perf_counter()
        lowered = fn.lower(*abstract)
        lowered_at = time.perf_counter()
        lowered.compile()
        end = time.perf_counter()
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"[:jobs.ERROR_CHARS]}
    return dict(lower_s=round(lowered_at - start, 3), compile_s=round(end - lowered_at, 3),
                seconds=round(end - start, 3))


# ------------------------------------------------------------------------------------------
# parse, run, report
# ------------------------------------------------------------------------------------------

def _power_of_two(name: str, value, low: int = 16) -> int:
    """`value` as an integer power of two >= `low` (for `validate.cli_type`)."""
    value = integer(name, value, low=low)
    if value & (value - 1):
        raise PolarJaxError(f"{name} must be a power of two >= {low}, got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = bench.parser("compile", __doc__.split("\n\n")[0])
    p.add_argument("--json", type=bench.OUTPUT_FILE,
                   help="write the rows (and the environment) here, after every row")
    p.add_argument("--only", nargs="+", choices=list(BUILDERS), default=list(BUILDERS),
                   metavar="NAME", help=f"compile only these rows: {', '.join(BUILDERS)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test, CPU ok)")
    p.add_argument("--in-process", action="store_true",
                   help="compile every row in this process, not each in a fresh one (later "
                        "rows may reuse earlier rows' kernels and autotuning)")
    p.add_argument("--topk-chunk", type=cli_type(_power_of_two, int), default=None,
                   help="top-k rows: hold rows of up to this many scores in registers, "
                        "longer ones in chunks of it (default: the kernel's choice)")
    args = p.parse_args(argv)
    args.command = "polar-jax bench compile " + " ".join(argv)
    return args


def _mark(row: dict) -> str:
    if "error" in row:
        return "error"
    if row["target_s"] is None:
        return "-"
    return f"< {row['target_s']:g} s {'met' if row['met'] else 'NOT met'}"


def format_row(row: dict) -> str:
    """One line of the table."""
    shape = ", ".join([f"{name} {value}" for name, value in row["args"].items()
                       if name != "chunk"] + ([row["path"]] if "path" in row else []))
    if "error" in row:
        last = (row["error"].splitlines() or [""])[-1][:300]
        return f"| {row['kernel']} | {shape} | - | - | error: {last} |"
    return (f"| {row['kernel']} | {shape} | {row['seconds']:.2f} | "
            f"{row['lower_s']:.2f} + {row['compile_s']:.2f} | {_mark(row)} |")


TABLE_HEAD = ("| kernel | shape | compile s | lower + compile | target |\n"
              "| --- | --- | --- | --- | --- |")


def run(args: argparse.Namespace, log=print, save=lambda result: None) -> dict:
    """Every row's compile time, as the JSON of `--json`: env, command, isolated, rows,
    targets_met, targets. `save` is called after every row."""
    from polar_jax.bench.kernels import environment

    start = time.time()
    env = environment()
    result = dict(env=env, command=args.command, isolated=not args.in_process, rows=[])
    log(f"# {env['device']} | jax {env['jax']} | {env['date']} | backend {env['backend']} | "
        f"{'each row in a fresh process' if not args.in_process else 'one process'}")
    log(TABLE_HEAD)
    if args.in_process:
        _warm_up()
    for row in plan_rows(args.quick, args.only, args.topk_chunk):
        if args.in_process:
            row.update(compile_row(row))
            jax.clear_caches()
        else:
            row.update(jobs.run(__name__, row, ROW_TIMEOUT_S))
        if "seconds" in row and row["target_s"] is not None:
            row["met"] = row["seconds"] < row["target_s"]
        result["rows"].append(row)
        log(format_row(row))
        result["seconds"] = round(time.time() - start, 1)
        save(result)
    judged = [r for r in result["rows"] if r["target_s"] is not None]
    result["targets"] = len(judged)
    result["targets_met"] = sum(bool(r.get("met")) for r in judged)
    save(result)
    return result


def report(result: dict) -> str:
    """The summary printed after the table: targets met, the rows that missed, the time."""
    lines = [f"\nTargets: {result['targets_met']}/{result['targets']} met (kernels < "
             f"{KERNEL_TARGET_S:g} s, sparse decode program < {PROGRAM_TARGET_S:g} s); total "
             f"{result['seconds']} s; {result['command']}"]
    lines += [f"  NOT met: {format_row(r)}" for r in result["rows"]
              if r["target_s"] is not None and not r.get("met")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the rows' processes too
    args = parse_args(list(sys.argv[1:] if argv is None else argv))

    def save(result):
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")

    result = run(args, log=lambda line: print(line, flush=True), save=save)
    print(report(result))
    return 0


if __name__ == "__main__":  # one row in a fresh process (`jobs.run`)
    _warm_up()
    jobs.reply(compile_row(json.load(sys.stdin)))
