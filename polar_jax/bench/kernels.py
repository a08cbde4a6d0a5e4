"""`polar-jax bench kernels`: the Pallas kernels against dense baselines.

In one run: the device-to-device copy bandwidth; then, timed,

- decode attention, fp16, D=128, (B, Hq/Hkv, S) in the issue's six shapes at group densities
  0.25 / 0.5 / 1.0: ours; XLA einsum decode; `jax.nn.dot_product_attention` (cuDNN, on a
  [B, S, Hkv, D] cache, its own layout); torch `scaled_dot_product_attention`
  (`polar_jax.bench.torch_peer`, a process of its own);
- the MLP, fp16, d in {4096, 8192}, N = 4d, B in {1, 16, 64, 256}, k/N in
  {0.05, 0.1, 0.25, 0.5, 1.0}: ours; the dense ReLU MLP in XLA; the same through torch/cuBLAS.

Timing (`polar_jax.bench.timing.time_calls`): N calls unrolled inside one jitted function
(straight-line, so no host round trip between calls), GPU time from a profiler trace, the
median of several runs of it, divided by N. Every call gets its own inputs (distinct index
sets, queries, lengths arrays), and the big arrays rotate among enough copies that one rotation
is several times the L2 cache, so bytes are never cache-resident and XLA cannot merge calls.
Inputs are random normal (never zeros). torch is timed by replaying a CUDA graph of N calls.

Effective bandwidth counts the bytes a method must read: K and V of the selected groups at the
full length (attention), the selected rows of w_in and w_out (MLP; dense: all rows).

The compiled kernels' correctness on the device is checked by the `gpu`-marked cases of
tests/test_kernel_*.py (`python -m pytest -q tests/test_kernel_*.py` on a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax import bench
from polar_jax.bench import torch_peer
from polar_jax.bench.timing import (COPY_BYTES, COPY_BYTES_CPU, ROTATION_BYTES, copy_bandwidth_jax,
                                    copy_case, estimate_ms, n_calls, time_calls)
from polar_jax.validate import cli_list, cli_type, number

ATTN_SHAPES = [(16, 32, 32, 4096), (64, 32, 32, 2048), (16, 32, 8, 4096), (64, 32, 8, 4096),
               (256, 32, 8, 2048), (1, 32, 8, 32768)]
ATTN_DENSITIES = [0.25, 0.5, 1.0]
MLP_DIMS = [4096, 8192]
MLP_BATCHES = [1, 16, 64, 256]
MLP_FRACTIONS = [0.05, 0.1, 0.25, 0.5, 1.0]
QUICK_ATTN_SHAPES = [(2, 8, 2, 256), (1, 4, 4, 300)]
QUICK_MLP = ([64], [1, 3], [0.25, 1.0])
HEAD_DIM = 128
# What a torch row contributes to ours: its times and how they were taken.
TORCH_MLP_KEYS = ("ms", "ms_min", "ms_max", "how", "error", "n_calls")
TORCH_ATTN_KEYS = TORCH_MLP_KEYS + ("variant", "variants", "errors")


def _interp() -> bool:
    return jax.default_backend() == "cpu"


def _time(fn, calls, reps, debug=False) -> dict:
    """`time_calls`, or {"error": ...}: a failing case is reported, the run goes on."""
    try:
        return time_calls(fn, calls, reps, debug=debug)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"[:500]}


def _with_tbps(row: dict) -> dict:
    """`row` with its effective bandwidth (its bytes over its time), where it has a time."""
    if "ms" in row:
        row["tbps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e12
    return row


# ------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------

def _xla_decode(q, k, v, lengths):
    """Dense decode attention `[B, Hq, D]` over caches `[B, Hkv, S, D]`, in XLA."""
    B, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    s = jnp.einsum("bhgd,bhsd->bhgs", q.reshape(B, Hkv, G, D), k,
                   preferred_element_type=jnp.float32) * (1.0 / math.sqrt(D))
    mask = jnp.arange(S)[None, :] < lengths[:, None]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgs,bhsd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, Hq, D).astype(q.dtype)


def _cudnn_decode(q, k_bshd, v_bshd, lengths):
    """Dense decode attention through cuDNN, on caches in its `[B, S, Hkv, D]` layout."""
    o = jax.nn.dot_product_attention(q[:, None], k_bshd, v_bshd, key_value_seq_lengths=lengths,
                                     implementation="cudnn")
    return o[:, 0]


def bench_attention(shape, densities, reps, target_ms, torch_rows, cfg_over=None, baselines=True,
                    log=print) -> list[dict]:
    """Rows of our kernel at each fraction of KV groups on `shape` (B, Hq, Hkv, S), fp16,
    D=128 (tile overrides `cfg_over`), then with `baselines` of XLA, cuDNN and the torch rows."""
    from pallas_kernels import sparse_decode_attention
    from pallas_kernels.sparse_attention import attention_config

    B, Hq, Hkv, S = shape
    D = HEAD_DIM
    dt = jnp.float16
    item = 2
    cache_bytes = 2 * B * Hkv * S * D * item
    n_sets = min(8, max(1, -(-ROTATION_BYTES // cache_bytes)))
    key = jax.random.PRNGKey(B * 7919 + Hkv * 31 + S)
    ks = jax.random.split(key, 2 * n_sets + 2)
    kc = [jax.random.normal(ks[i], (B, Hkv, S, D), dt) for i in range(n_sets)]
    vc = [jax.random.normal(ks[n_sets + i], (B, Hkv, S, D), dt) for i in range(n_sets)]
    qs = [jax.random.normal(k_, (B, Hq, D), dt) for k_ in jax.random.split(ks[-1], 4)]
    rng = np.random.default_rng(B + S)
    rows = []
    for dens in densities:
        k = max(1, int(round(dens * Hkv)))
        nbytes = B * k * S * D * 2 * item
        n = n_calls(estimate_ms(nbytes), target_ms)
        calls = []
        for i in range(n):
            gi = np.argsort(rng.random((B, Hkv)), axis=1)[:, :k].astype(np.int32)
            calls.append((qs[i % 4], kc[i % n_sets], vc[i % n_sets], jnp.full((B,), S, jnp.int32),
                          jnp.asarray(gi)))
        over = dict(cfg_over or {})
        cfg = attention_config(B, k, S, D, Hq // Hkv, interpret=_interp(), **over)
        fn = lambda q, kk, vv, ln, gi, _o=over: sparse_decode_attention(q, kk, vv, ln, gi, **_o)
        t = _time(fn, calls, reps, debug=dens == densities[0])
        rows.append(_with_tbps(dict(kind="attn", method="ours", B=B, Hq=Hq, Hkv=Hkv, S=S, D=D,
                                    density=dens, k=k, bytes=nbytes, config=cfg, **t)))
        log(format_row(rows[-1]))
        del calls
    if baselines:
        dense_bytes = B * Hkv * S * D * 2 * item
        n = n_calls(estimate_ms(dense_bytes), target_ms)
        calls = [(qs[i % 4], kc[i % n_sets], vc[i % n_sets], jnp.full((B,), S, jnp.int32))
                 for i in range(n)]
        dense = dict(kind="attn", B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, density=1.0, k=Hkv,
                     bytes=dense_bytes)
        rows.append(_with_tbps(dict(dense, method="xla-einsum", **_time(_xla_decode, calls, reps))))
        log(format_row(rows[-1]))
        del calls
        # cuDNN wants [B, S, H, D]; give it caches in its own layout.
        kb = [jnp.swapaxes(x, 1, 2) for x in kc]
        vb = [jnp.swapaxes(x, 1, 2) for x in vc]
        del kc, vc
        calls = [(qs[i % 4], kb[i % n_sets], vb[i % n_sets], jnp.full((B,), S, jnp.int32))
                 for i in range(n)]
        rows.append(_with_tbps(dict(dense, method="cudnn", **_time(_cudnn_decode, calls, reps))))
        log(format_row(rows[-1]))
        del calls, kb, vb
        for tr in torch_rows:
            if tr.get("kind") == "attn" and (tr["B"], tr["Hq"], tr["Hkv"], tr["S"]) == shape:
                rows.append(_with_tbps(dict(dense, method="torch-sdpa", **{
                    k_: v_ for k_, v_ in tr.items() if k_ in TORCH_ATTN_KEYS})))
                log(format_row(rows[-1]))
    return rows


# ------------------------------------------------------------------------------------------
# MLP
# ------------------------------------------------------------------------------------------

def _xla_dense_mlp(x, w_in, b_in, w_out, b_out):
    """The dense ReLU MLP `[B, d]` with w_in, w_out `[N, d]`."""
    h = jax.nn.relu(jnp.dot(x, w_in.T) + b_in)
    return jnp.dot(h, w_out) + b_out


def bench_mlp(d, batches, fractions, reps, target_ms, torch_rows, up=None, down=None,
              baselines=True, log=print) -> list[dict]:
    """Rows of our ReLU MLP kernel, fp16, N = 4d, at each batch size and fraction of neurons
    (tile overrides `up`, `down`), then with `baselines` of the dense MLP in XLA and the torch
    rows."""
    from pallas_kernels import selective_mlp
    from pallas_kernels.selective_mlp import mlp_config

    N = 4 * d
    dt = jnp.float16
    item = 2
    key = jax.random.PRNGKey(d)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    w_in = jax.random.normal(k1, (N, d), dt) * dt(d ** -0.5)
    w_out = jax.random.normal(k2, (N, d), dt) * dt(N ** -0.5)
    b_in = jax.random.normal(k3, (N,), dt)
    b_out = jax.random.normal(k4, (d,), dt)
    rng = np.random.default_rng(d)
    rows = []
    for B in batches:
        xs = [jax.random.normal(k_, (B, d), dt) for k_ in jax.random.split(jax.random.fold_in(k5, B), 8)]
        for frac in fractions:
            k = max(1, int(round(frac * N)))
            nbytes = 2 * k * d * item
            n = n_calls(estimate_ms(nbytes, 2 * B * k * d), target_ms)
            calls = []
            for i in range(n):
                idx = rng.permutation(N)[:k].astype(np.int32)
                calls.append((xs[i % 8], w_in, b_in, w_out, b_out, jnp.asarray(idx)))
            u, dn = mlp_config(B, d, k, interpret=_interp(), up=up, down=down)
            fn = lambda x, wi, bi, wo, bo, idx, _u=up, _d=down: selective_mlp(
                x, wi, bi, wo, bo, idx, activation="relu", up_config=_u, down_config=_d)
            t = _time(fn, calls, reps, debug=frac == fractions[0])
            rows.append(_with_tbps(dict(kind="mlp", method="ours", B=B, d=d, N=N, fraction=frac,
                                        k=k, bytes=nbytes, config=dict(up=u, down=dn), **t)))
            log(format_row(rows[-1]))
            del calls
        if baselines:
            dense_bytes = 2 * N * d * item
            n = n_calls(estimate_ms(dense_bytes, 2 * B * N * d, launch_ms=0.0), target_ms, hi=40)
            calls = [(jax.random.normal(jax.random.fold_in(k5, 1000 * B + i), (B, d), dt), w_in,
                      b_in, w_out, b_out) for i in range(n)]
            dense = dict(kind="mlp", B=B, d=d, N=N, fraction=1.0, k=N, bytes=dense_bytes)
            rows.append(_with_tbps(dict(dense, method="xla-dense",
                                        **_time(_xla_dense_mlp, calls, reps))))
            log(format_row(rows[-1]))
            del calls
            for tr in torch_rows:
                if tr.get("kind") == "mlp" and (tr["B"], tr["d"]) == (B, d):
                    rows.append(_with_tbps(dict(dense, method="torch-cublas", **{
                        k_: v_ for k_, v_ in tr.items() if k_ in TORCH_MLP_KEYS})))
                    log(format_row(rows[-1]))
        del xs
    del w_in, w_out
    return rows


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def format_row(r):
    """One progress line of a row."""
    if r["kind"] == "attn":
        what = f"attn B{r['B']:<3} {r['Hq']}/{r['Hkv']:<2} S{r['S']:<5} dens {r['density']:.2f}"
    else:
        what = f"mlp  d{r['d']} B{r['B']:<3} k/N {r['fraction']:.2f}"
    if "ms" not in r:
        return f"{what:<40} {r['method']:<13} ERROR {r.get('error', '')[:200]}"
    return (f"{what:<40} {r['method']:<13} {r['ms']:8.4f} ms (kern {r.get('kernel_ms') or 0:.4f}) "
            f"{r.get('tbps', 0):5.2f} TB/s "
            f"(n={r.get('n_calls', '?')}, spread {r.get('ms_min', 0):.4f}-{r.get('ms_max', 0):.4f})")


def evaluate(rows, copy_tbps):
    """Adds pct_copy / speedup / targets to the rows; returns (tables, target list)."""
    targets = []
    attn_shapes = sorted({(r["B"], r["Hq"], r["Hkv"], r["S"]) for r in rows if r["kind"] == "attn"},
                         key=lambda s: ATTN_SHAPES.index(s) if s in ATTN_SHAPES else 99)
    attn_table = []
    for shape in attn_shapes:
        rs = [r for r in rows if r["kind"] == "attn" and (r["B"], r["Hq"], r["Hkv"], r["S"]) == shape]
        base = {r["method"]: r for r in rs if r["method"] != "ours" and "ms" in r}
        best = min(base.values(), key=lambda r: r["ms"]) if base else None
        torch_r = base.get("torch-sdpa")
        for r in rs:
            if "ms" in r:
                r["pct_copy"] = 100 * r["tbps"] * 1e12 / copy_tbps / 1e12 if copy_tbps else None
                r["speedup_vs_best_dense"] = best["ms"] / r["ms"] if best else None
            marks = []
            if r["method"] == "ours":
                name = f"attn {shape} dens {r['density']}"
                if r["bytes"] >= 128e6:
                    ok = "ms" in r and r["pct_copy"] >= 90
                    targets.append(dict(target="attn >=90% of copy bw (bytes >= 128 MB)", case=name,
                                        value=r.get("pct_copy"), need=90, met=bool(ok)))
                    marks.append(f"bw {'met' if ok else 'NOT met'}")
                if r["density"] == 1.0 and torch_r:
                    ratio = r["ms"] / torch_r["ms"] if "ms" in r else float("inf")
                    ok = ratio <= 1.10
                    targets.append(dict(target="attn density 1.0 within 10% of torch SDPA",
                                        case=name, value=ratio, need=1.10, met=bool(ok)))
                    marks.append(f"vs SDPA {'met' if ok else 'NOT met'}")
                if r["density"] == 0.5 and torch_r and shape[0] >= 16:
                    sp = torch_r["ms"] / r["ms"] if "ms" in r else 0.0
                    ok = sp >= 1.8
                    targets.append(dict(target="attn 50% groups >= 1.8x faster than torch SDPA",
                                        case=name, value=sp, need=1.8, met=bool(ok)))
                    marks.append(f"1.8x {'met' if ok else 'NOT met'}")
            r["targets"] = marks
            attn_table.append(r)
    mlp_table = []
    for d in sorted({r["d"] for r in rows if r["kind"] == "mlp"}):
        for B in sorted({r["B"] for r in rows if r["kind"] == "mlp" and r["d"] == d}):
            rs = [r for r in rows if r["kind"] == "mlp" and r["d"] == d and r["B"] == B]
            base = {r["method"]: r for r in rs if r["method"] != "ours" and "ms" in r}
            best = min(base.values(), key=lambda r: r["ms"]) if base else None
            for r in rs:
                if "ms" in r:
                    r["pct_copy"] = 100 * r["tbps"] / copy_tbps if copy_tbps else None
                    r["speedup_vs_best_dense"] = best["ms"] / r["ms"] if best else None
                    xla = base.get("xla-dense")
                    r["speedup_vs_xla_dense"] = xla["ms"] / r["ms"] if xla else None
                marks = []
                if r["method"] == "ours":
                    name = f"mlp d{d} B{B} k/N {r['fraction']}"
                    if d == 8192 and B <= 64 and r["fraction"] >= 0.1:
                        ok = "ms" in r and r["pct_copy"] >= 80
                        targets.append(dict(target="mlp d=8192 B<=64 k/N>=0.1: >=80% of copy bw",
                                            case=name, value=r.get("pct_copy"), need=80, met=bool(ok)))
                        marks.append(f"bw {'met' if ok else 'NOT met'}")
                    if r["fraction"] == 0.1 and B <= 16 and best:
                        sp = r.get("speedup_vs_best_dense", 0.0) or 0.0
                        ok = sp >= 7
                        targets.append(dict(target="mlp k/N=0.1 B<=16: >=7x faster than dense",
                                            case=name, value=sp, need=7, met=bool(ok)))
                        marks.append(f"7x {'met' if ok else 'NOT met'}")
                    if B == 256 and r["fraction"] <= 0.5 and best:
                        sp = r.get("speedup_vs_best_dense", 0.0) or 0.0
                        ok = sp >= 1.0
                        targets.append(dict(target="mlp B=256 k/N<=0.5: not slower than dense",
                                            case=name, value=sp, need=1.0, met=bool(ok)))
                        marks.append(f"B256 {'met' if ok else 'NOT met'}")
                r["targets"] = marks
                mlp_table.append(r)
    return attn_table, mlp_table, targets


def _timing_cells(r):
    """ms, kernel ms, TB/s, % of copy and speedup cells of a table row."""
    return (f"{r['ms']:.4f}" if "ms" in r else "error",
            f"{r['kernel_ms']:.4f}" if r.get("kernel_ms") else "-",
            f"{r['tbps']:.2f}" if "ms" in r else "-",
            f"{r['pct_copy']:.0f}%" if r.get("pct_copy") is not None else "-",
            f"{r['speedup_vs_best_dense']:.2f}x" if r.get("speedup_vs_best_dense") else "-")


def format_tables(attn_table, mlp_table, targets, copy_tbps):
    out = []
    if attn_table:
        out.append(f"\nDecode attention, fp16, D=128 (copy bandwidth {copy_tbps:.2f} TB/s)")
        out.append("| B | Hq/Hkv | S | method | groups | ms | kernel ms | TB/s | % copy | speedup vs best dense | targets |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in attn_table:
            grp = f"{r['density']:.2f} ({r['k']}/{r['Hkv']})" if r["method"] == "ours" else "all"
            meth = r["method"] + (f" ({r['variant']})" if r.get("variant") else "")
            ms, km, tb, pc, sp = _timing_cells(r)
            out.append(f"| {r['B']} | {r['Hq']}/{r['Hkv']} | {r['S']} | {meth} | {grp} | {ms} | {km} | {tb} | "
                       f"{pc} | {sp} | {', '.join(r.get('targets', []))} |")
    if mlp_table:
        out.append(f"\nMLP, fp16, N = 4d (copy bandwidth {copy_tbps:.2f} TB/s)")
        out.append("| d | B | method | k/N | ms | kernel ms | TB/s | % copy | speedup vs best dense | vs XLA dense | targets |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in mlp_table:
            ms, km, tb, pc, sp = _timing_cells(r)
            sx = f"{r['speedup_vs_xla_dense']:.2f}x" if r.get("speedup_vs_xla_dense") else "-"
            out.append(f"| {r['d']} | {r['B']} | {r['method']} | {r['fraction']:.2f} | {ms} | {km} | {tb} | "
                       f"{pc} | {sp} | {sx} | {', '.join(r.get('targets', []))} |")
    if targets:
        met = sum(t["met"] for t in targets)
        out.append(f"\nTargets: {met}/{len(targets)} met")
        for t in targets:
            if not t["met"]:
                v = t["value"]
                out.append(f"  NOT met: {t['target']}: {t['case']}: "
                           f"{'n/a' if v is None else f'{v:.3g}'} (need {t['need']})")
    return "\n".join(out)


def environment() -> dict:
    """The run's date, versions, backend, device, host (and triton, SM count where known)."""
    import jaxlib

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               jax=jax.__version__, jaxlib=getattr(jaxlib, "__version__", "?"),
               python=platform.python_version(), backend=jax.default_backend(),
               device=str(jax.devices()[0].device_kind), host=platform.node())
    try:
        import triton  # noqa: F401

        env["triton"] = triton.__version__
    except Exception:
        pass
    try:
        env["sm_count"] = int(jax.devices()[0].core_count)
    except Exception:
        pass
    return env


# ------------------------------------------------------------------------------------------
# parse, run, report
# ------------------------------------------------------------------------------------------

def _attn_shape(text: str) -> tuple[int, int, int, int]:
    """An argparse type: "B,Hq,Hkv,S", four integers >= 1 with Hq a multiple of Hkv."""
    shape = cli_list(bench.COUNT)(text)
    if len(shape) != 4 or shape[1] % shape[2]:
        raise argparse.ArgumentTypeError(
            f"must be B,Hq,Hkv,S: four integers >= 1, Hq a multiple of Hkv; got {text!r}")
    return tuple(shape)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = bench.parser("kernels", __doc__.split("\n\n")[0])
    p.add_argument("--json", type=bench.OUTPUT_FILE, help="write every measurement (and the environment) to this file")
    p.add_argument("--only", choices=["all", "attn", "mlp", "none"], default="all",
                   help="which kernels to time")
    p.add_argument("--reps", type=bench.COUNT, default=5, help="timed repeats; the median is reported")
    p.add_argument("--target-ms", type=cli_type(number, float, low=0, low_open=True), default=4.0,
                   help="aim for this much GPU time per timed repeat (sets calls per jit)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    p.add_argument("--sweep", action="store_true", help="also time tiling variants (tuning)")
    p.add_argument("--sweep-only", action="store_true", help="only the tuning sweep")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test, CPU ok)")
    p.add_argument("--d", type=bench.COUNT, nargs="+", help="MLP d values (default 4096 8192)")
    p.add_argument("--attn-shapes", type=_attn_shape, nargs="+",
                   help="attention shapes as B,Hq,Hkv,S (default: the issue's six)")
    args = p.parse_args(argv)
    args.command = "polar-jax bench kernels " + " ".join(argv)
    return args


def _torch_cases(attn_shapes, mlp_d, mlp_b, target_ms) -> list[dict]:
    """The torch peer's cases: the copy, then the dense baseline of every shape timed here."""
    cases = [copy_case()]
    for (B, Hq, Hkv, S) in attn_shapes:
        nb = 2 * B * Hkv * S * HEAD_DIM * 2
        cases.append(dict(kind="attn", B=B, Hq=Hq, Hkv=Hkv, S=S, D=HEAD_DIM,
                          n_calls=n_calls(estimate_ms(nb), target_ms)))
    for d in mlp_d:
        for B in mlp_b:
            nb = 2 * 4 * d * d * 2
            cases.append(dict(kind="mlp", B=B, d=d, N=4 * d, n_calls=n_calls(
                estimate_ms(nb, 2 * B * 4 * d * d, launch_ms=0.0), target_ms, hi=40)))
    return cases


def run(args: argparse.Namespace, log=print, save=lambda result: None) -> dict:
    """Every measurement `args` asks for, as the JSON of `--json`: env, command, rotation_bytes,
    torch, copy_jax, read_jax, copy_torch_tbps, copy_tbps, rows, targets (and sweep). `save` is
    called with the result after the tables and after the sweep."""
    import warnings

    from polar_jax.bench.kernel_sweep import format_sweep, run_sweep

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    t_start = time.time()
    env = environment()
    result = dict(env=env, command=args.command, rotation_bytes=ROTATION_BYTES)
    log(f"# {env['device']} | jax {env['jax']} | {env['date']} | backend {env['backend']}")
    gpu = env["backend"] == "gpu"
    attn_shapes, (mlp_d, mlp_b, mlp_f) = ((QUICK_ATTN_SHAPES, QUICK_MLP) if args.quick else
                                          (ATTN_SHAPES, (MLP_DIMS, MLP_BATCHES, MLP_FRACTIONS)))
    attn_shapes, mlp_d = args.attn_shapes or attn_shapes, args.d or mlp_d
    do_attn = args.only in ("all", "attn") and not args.sweep_only
    do_mlp = args.only in ("all", "mlp") and not args.sweep_only

    # 1. torch (its own process, before JAX allocates much): copy bandwidth and dense baselines.
    torch_rows = []
    if gpu and not args.no_torch and not args.sweep_only and torch_peer.cuda_available():
        t0 = time.time()
        cases = _torch_cases(attn_shapes if do_attn else [], mlp_d if do_mlp else [], mlp_b,
                             args.target_ms)
        tr = torch_peer.run("kernels", torch_peer.KERNELS_TIMEOUT_S, cases=cases, reps=args.reps,
                            rotation_bytes=ROTATION_BYTES)
        result["torch"] = tr
        torch_rows = tr.get("cases", [])
        log(f"# torch baselines: {tr.get('torch', tr.get('error', '?'))[:300]} "
            f"({time.time() - t0:.0f} s)")

    # 2. copy bandwidth
    copy_jax, read_jax = copy_bandwidth_jax(args.reps, COPY_BYTES if gpu else COPY_BYTES_CPU)
    result["copy_jax"], result["read_jax"] = copy_jax, read_jax
    copy_torch = next((c.get("tbps") for c in torch_rows if c.get("kind") == "copy"), None)
    result["copy_torch_tbps"] = copy_torch
    copy_tbps = max(x for x in (copy_jax["tbps"], copy_torch or 0.0))
    result["copy_tbps"] = copy_tbps
    log(f"# copy bandwidth (read+write): jax {copy_jax['tbps']:.2f} TB/s, torch "
        f"{copy_torch if copy_torch is None else f'{copy_torch:.2f}'} TB/s -> using {copy_tbps:.2f}; "
        f"jax read-only reduce {read_jax['tbps']:.2f} TB/s")

    # 3. the kernels and their baselines
    rows = []
    if do_attn:
        for shape in attn_shapes:
            rows += bench_attention(shape, ATTN_DENSITIES, args.reps, args.target_ms, torch_rows,
                                    log=log)
            jax.clear_caches()
    if do_mlp:
        for d in mlp_d:
            rows += bench_mlp(d, mlp_b, mlp_f, args.reps, args.target_ms, torch_rows, log=log)
            jax.clear_caches()
    result["rows"] = rows
    result["tables"] = evaluate(rows, copy_tbps)
    result["targets"] = result["tables"][2]
    result["seconds"] = round(time.time() - t_start, 1)
    save(result)
    if rows:
        log(format_tables(*result["tables"], copy_tbps))
    if args.sweep or args.sweep_only:
        result["sweep"] = run_sweep(args.reps, args.target_ms, log=log)
        log(format_sweep(result["sweep"]))
        result["seconds"] = round(time.time() - t_start, 1)
        save(result)
    return result


def report(result: dict) -> str:
    """The summary printed at the end of a run: the environment, the tables, the time."""
    env = result["env"]
    return (f"\n# {env['device']} | jax {env['jax']} | {env['date']} | {result['command']}\n"
            f"{format_tables(*result['tables'], result['copy_tbps'])}\n"
            f"# total {result['seconds']} s")


def save_json(result: dict, path: str) -> None:
    """`result` as JSON at `path` (the tables are views of the rows: not written twice)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({k: v for k, v in result.items() if k != "tables"}, fh, indent=1, default=str)


def main(argv: list[str] | None = None) -> int:
    # torch runs in a process beside us: do not let XLA take 75% of the GPU up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    save = (lambda result: save_json(result, args.json)) if args.json else (lambda result: None)
    result = run(args, log=lambda line: print(line, flush=True), save=save)
    print(report(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
