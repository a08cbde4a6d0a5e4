"""`polar-jax bench kernels`: the Pallas kernels against dense baselines.

In one run: the device-to-device copy bandwidth; a correctness check of the compiled kernels
against the pure-`jnp` references on the device; then, timed,

- decode attention, fp16, D=128, (B, Hq/Hkv, S) in the issue's six shapes at group densities
  0.25 / 0.5 / 1.0: ours; XLA einsum decode; `jax.nn.dot_product_attention` (cuDNN, on a
  [B, S, Hkv, D] cache, its own layout); torch `scaled_dot_product_attention` (a subprocess);
- the MLP, fp16, d in {4096, 8192}, N = 4d, B in {1, 16, 64, 256}, k/N in
  {0.05, 0.1, 0.25, 0.5, 1.0}: ours; the dense ReLU MLP in XLA; the same through torch/cuBLAS.

Timing: N calls unrolled inside one jitted function (straight-line, so no host round trip
between calls), the median of several runs of it, minus the cost of dispatching an empty
function with the same arguments, divided by N. Every call gets its own inputs (distinct index
sets, queries, lengths arrays), and the big arrays rotate among enough copies that one rotation
is several times the L2 cache, so bytes are never cache-resident and XLA cannot merge calls.
Inputs are random normal (never zeros). torch is timed by replaying a CUDA graph of N calls.

Effective bandwidth counts the bytes a method must read: K and V of the selected groups at the
full length (attention), the selected rows of w_in and w_out (MLP; dense: all rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

from polar_jax import bench
from polar_jax.bench.trace import busy_ns, kernel_events
from polar_jax.validate import cli_list, cli_type, number

ATTN_SHAPES = [(16, 32, 32, 4096), (64, 32, 32, 2048), (16, 32, 8, 4096), (64, 32, 8, 4096),
               (256, 32, 8, 2048), (1, 32, 8, 32768)]
ATTN_DENSITIES = [0.25, 0.5, 1.0]
MLP_DIMS = [4096, 8192]
MLP_BATCHES = [1, 16, 64, 256]
MLP_FRACTIONS = [0.05, 0.1, 0.25, 0.5, 1.0]
QUICK_ATTN_SHAPES = [(2, 8, 2, 256), (1, 4, 4, 300)]
QUICK_MLP = ([64], [1, 3], [0.25, 1.0])

L2_BYTES = 64 << 20  # a bit above the H100's 50 MB / H200's 60 MB L2
ROTATION_BYTES = 3 * L2_BYTES


# ------------------------------------------------------------------------------------------
# torch baselines (a subprocess, so that torch and JAX never share the process)
# ------------------------------------------------------------------------------------------

_TORCH_SCRIPT = r"""
import json, statistics, sys
import torch
import torch.nn.functional as F

cfg = json.load(sys.stdin)
reps = cfg["reps"]
rotation = cfg["rotation_bytes"]
dev = "cuda"
torch.manual_seed(0)
out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "cases": []}


def graph_time(calls):
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls[:2]:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        run = g.replay
        how = "cuda-graph"
    except Exception:
        def run():
            for c in calls:
                c()
        how = "eager"
    run()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        run()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / len(calls))
    del run
    return statistics.median(ts), min(ts), max(ts), how


for case in cfg["cases"]:
    rec = dict(case)
    try:
        n = case["n_calls"]
        if case["kind"] == "copy":
            # Three ways; the fastest is the copy bandwidth (bytes read + bytes written).
            methods = {}
            numel = case["bytes"] // 2
            srcs = [torch.randn(numel, device=dev, dtype=torch.float16) for _ in range(2)]
            dsts = [torch.empty_like(srcs[0]) for _ in range(2)]
            calls = [lambda i=i: dsts[i % 2].copy_(srcs[i % 2]) for i in range(n)]
            methods["copy_ graph"] = graph_time(calls)[0]
            calls = [lambda i=i: torch.mul(srcs[i % 2], 1.0, out=dsts[i % 2]) for i in range(n)]
            methods["mul kernel graph"] = graph_time(calls)[0]
            del srcs, dsts, calls
            torch.cuda.empty_cache()
            big = 4 * case["bytes"]
            src = torch.randn(big // 2, device=dev, dtype=torch.float16)
            dst = torch.empty_like(src)
            for _ in range(2):
                dst.copy_(src)
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                e0 = torch.cuda.Event(enable_timing=True)
                e1 = torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(3):
                    dst.copy_(src)
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1) / 3 * case["bytes"] / big)
            methods["copy_ eager 4x size"] = statistics.median(ts)
            del src, dst
            rec["methods_tbps"] = {k: 2 * case["bytes"] / (v * 1e-3) / 1e12 for k, v in methods.items()}
            best = min(methods, key=methods.get)
            rec["ms"], rec["how"] = methods[best], best
            rec["tbps"] = 2 * case["bytes"] / (rec["ms"] * 1e-3) / 1e12
        elif case["kind"] == "attn":
            B, Hq, Hkv, S, D = case["B"], case["Hq"], case["Hkv"], case["S"], case["D"]
            G = Hq // Hkv
            cache = 2 * B * Hkv * S * D * 2
            n_sets = max(1, -(-rotation // cache))
            ks = [torch.randn(B, Hkv, S, D, device=dev, dtype=torch.float16) for _ in range(n_sets)]
            vs = [torch.randn(B, Hkv, S, D, device=dev, dtype=torch.float16) for _ in range(n_sets)]
            qs = [torch.randn(B, Hq, 1, D, device=dev, dtype=torch.float16) for _ in range(4)]
            best = None
            variants = [("sdpa", False)] if G == 1 else [("sdpa enable_gqa", True), ("sdpa grouped-rows", False)]
            for name, gqa in variants:
                if gqa:
                    calls = [lambda i=i: F.scaled_dot_product_attention(
                        qs[i % 4], ks[i % n_sets], vs[i % n_sets], enable_gqa=True) for i in range(n)]
                else:
                    calls = [lambda i=i: F.scaled_dot_product_attention(
                        qs[i % 4].view(B, Hkv, G, D), ks[i % n_sets], vs[i % n_sets]) for i in range(n)]
                try:
                    t = graph_time(calls)
                except Exception as err:  # a variant the build does not support
                    rec.setdefault("errors", []).append(f"{name}: {err}"[:300])
                    continue
                rec.setdefault("variants", {})[name] = t[0]
                if best is None or t[0] < best[0][0]:
                    best = (t, name)
                del calls
            if best is not None:
                (rec["ms"], rec["ms_min"], rec["ms_max"], rec["how"]), rec["variant"] = best
            del ks, vs, qs
        elif case["kind"] == "mlp":
            B, d, N = case["B"], case["d"], case["N"]
            w_in = torch.randn(N, d, device=dev, dtype=torch.float16) * d ** -0.5
            w_out = torch.randn(N, d, device=dev, dtype=torch.float16) * N ** -0.5
            b_in = torch.randn(N, device=dev, dtype=torch.float16)
            b_out = torch.randn(d, device=dev, dtype=torch.float16)
            xs = [torch.randn(B, d, device=dev, dtype=torch.float16) for _ in range(8)]
            calls = [lambda i=i: torch.addmm(b_out, F.relu(F.linear(xs[i % 8], w_in, b_in)), w_out)
                     for i in range(n)]
            rec["ms"], rec["ms_min"], rec["ms_max"], rec["how"] = graph_time(calls)
            del w_in, w_out, xs, calls
        torch.cuda.empty_cache()
    except Exception as err:
        rec["error"] = f"{type(err).__name__}: {err}"[:500]
        torch.cuda.empty_cache()
    out["cases"].append(rec)
print("@@TORCH_JSON@@" + json.dumps(out))
"""


def _torch_available() -> bool:
    try:
        r = subprocess.run([sys.executable, "-c", "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 3)"],
                           capture_output=True, timeout=120)
        return r.returncode == 0
    except Exception:
        return False


def run_torch(cases, reps, timeout=600):
    payload = json.dumps({"cases": cases, "reps": reps, "rotation_bytes": ROTATION_BYTES})
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", _TORCH_SCRIPT], input=payload, capture_output=True,
                       text=True, timeout=timeout, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("@@TORCH_JSON@@"):
            return json.loads(line[len("@@TORCH_JSON@@"):])
    return {"error": (r.stderr or r.stdout)[-2000:]}


# ------------------------------------------------------------------------------------------
# JAX timing
# ------------------------------------------------------------------------------------------

def _interp() -> bool:
    import jax

    return jax.default_backend() == "cpu"


def _n_calls(est_ms: float, target_ms: float, lo=8, hi=50) -> int:
    return int(min(hi, max(lo, round(target_ms / max(est_ms, 1e-4)))))


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


def time_calls(fn, calls, reps, debug=False):
    """ms per call of `fn(*c) for c in calls`, unrolled inside one jit.

    Primary: GPU time from a profiler trace (CUPTI), per repeat the span from the first kernel
    start to the last kernel end (launch gaps between our kernels included, host dispatch and
    sync excluded) divided by the number of calls; median over repeats. `kernel_ms` is the busy
    time (union of kernel intervals) per call. Fallback where no trace can be read: host wall
    clock minus the dispatch cost of an empty function with the same arguments.
    """
    import shutil
    import tempfile

    import jax

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
    over = []
    for _ in range(max(3, reps)):
        t0 = time.perf_counter()
        jax.block_until_ready(empty(calls))
        over.append(time.perf_counter() - t0)
    overhead = statistics.median(over)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(calls))
        ts.append(time.perf_counter() - t0)
    per = [max(t - overhead, 1e-9) / n * 1e3 for t in ts]
    res.update(ms=statistics.median(per), ms_min=min(per), ms_max=max(per),
               overhead_ms=overhead * 1e3, timing="wall-clock")
    return res


def copy_bandwidth_jax(reps, nbytes):
    import jax
    import jax.numpy as jnp

    numel = nbytes // 2
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    xs = [jax.random.normal(k_, (numel,), jnp.float16) for k_ in keys]
    n = 10
    calls = [(xs[i % 2], jnp.float16(1 + (i % 7) / 64)) for i in range(n)]
    copy = time_calls(lambda x, c: x * c, calls, reps)
    copy["tbps"] = 2 * nbytes / (copy["ms"] * 1e-3) / 1e12
    read = time_calls(lambda x, c: jnp.sum(x.astype(jnp.float32)) * c, calls, reps)
    read["tbps"] = nbytes / (read["ms"] * 1e-3) / 1e12
    del xs, calls
    return copy, read


# ------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------

def _xla_decode(q, k, v, lengths):
    import jax
    import jax.numpy as jnp

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
    import jax

    o = jax.nn.dot_product_attention(q[:, None], k_bshd, v_bshd, key_value_seq_lengths=lengths,
                                     implementation="cudnn")
    return o[:, 0]


def bench_attention(shape, densities, reps, target_ms, torch_rows, cfg_over=None, baselines=True,
                    log=print):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import sparse_decode_attention
    from pallas_kernels.sparse_attention import attention_config

    B, Hq, Hkv, S = shape
    D = 128
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
        n = _n_calls(nbytes / 2.8e12 * 1e3 + 0.004, target_ms)
        calls = []
        for i in range(n):
            gi = np.argsort(rng.random((B, Hkv)), axis=1)[:, :k].astype(np.int32)
            calls.append((qs[i % 4], kc[i % n_sets], vc[i % n_sets], jnp.full((B,), S, jnp.int32),
                          jnp.asarray(gi)))
        over = dict(cfg_over or {})
        cfg = attention_config(B, k, S, D, Hq // Hkv, interpret=_interp(), **over)
        fn = lambda q, kk, vv, ln, gi, _o=over: sparse_decode_attention(q, kk, vv, ln, gi, **_o)
        try:
            t = time_calls(fn, calls, reps, debug=dens == densities[0])
        except Exception as err:  # keep going: report the failure
            t = {"error": f"{type(err).__name__}: {err}"[:500]}
        row = dict(kind="attn", method="ours", B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, density=dens, k=k,
                   bytes=nbytes, config=cfg, **t)
        if "ms" in t:
            row["tbps"] = nbytes / (t["ms"] * 1e-3) / 1e12
        rows.append(row)
        log(_fmt_row(row))
        del calls
    if baselines:
        dense_bytes = B * Hkv * S * D * 2 * item
        n = _n_calls(dense_bytes / 2.8e12 * 1e3 + 0.004, target_ms)
        calls = [(qs[i % 4], kc[i % n_sets], vc[i % n_sets], jnp.full((B,), S, jnp.int32))
                 for i in range(n)]
        for name, fn, cl in (("xla-einsum", _xla_decode, calls),):
            try:
                t = time_calls(fn, cl, reps)
            except Exception as err:
                t = {"error": f"{type(err).__name__}: {err}"[:500]}
            row = dict(kind="attn", method=name, B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, density=1.0,
                       k=Hkv, bytes=dense_bytes, **t)
            if "ms" in t:
                row["tbps"] = dense_bytes / (t["ms"] * 1e-3) / 1e12
            rows.append(row)
            log(_fmt_row(row))
        del calls
        # cuDNN wants [B, S, H, D]; give it caches in its own layout.
        kb = [jnp.swapaxes(x, 1, 2) for x in kc]
        vb = [jnp.swapaxes(x, 1, 2) for x in vc]
        del kc, vc
        calls = [(qs[i % 4], kb[i % n_sets], vb[i % n_sets], jnp.full((B,), S, jnp.int32))
                 for i in range(n)]
        try:
            t = time_calls(_cudnn_decode, calls, reps)
        except Exception as err:
            t = {"error": f"{type(err).__name__}: {err}"[:500]}
        row = dict(kind="attn", method="cudnn", B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, density=1.0, k=Hkv,
                   bytes=dense_bytes, **t)
        if "ms" in t:
            row["tbps"] = dense_bytes / (t["ms"] * 1e-3) / 1e12
        rows.append(row)
        log(_fmt_row(row))
        del calls, kb, vb
        for tr in torch_rows:
            if tr.get("kind") == "attn" and (tr["B"], tr["Hq"], tr["Hkv"], tr["S"]) == shape:
                row = dict(kind="attn", method="torch-sdpa", B=B, Hq=Hq, Hkv=Hkv, S=S, D=D,
                           density=1.0, k=Hkv, bytes=dense_bytes,
                           **{k_: v_ for k_, v_ in tr.items() if k_ in (
                               "ms", "ms_min", "ms_max", "how", "variant", "variants", "error",
                               "errors", "n_calls")})
                if "ms" in row:
                    row["tbps"] = dense_bytes / (row["ms"] * 1e-3) / 1e12
                rows.append(row)
                log(_fmt_row(row))
    return rows


# ------------------------------------------------------------------------------------------
# MLP
# ------------------------------------------------------------------------------------------

def _xla_dense_mlp(x, w_in, b_in, w_out, b_out):
    import jax
    import jax.numpy as jnp

    h = jax.nn.relu(jnp.dot(x, w_in.T) + b_in)
    return jnp.dot(h, w_out) + b_out


def bench_mlp(d, batches, fractions, reps, target_ms, torch_rows, up=None, down=None,
              baselines=True, log=print):
    import jax
    import jax.numpy as jnp
    import numpy as np

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
            n = _n_calls(nbytes / 2.8e12 * 1e3 + 0.004 + 2 * B * k * d / 4e14 * 1e3, target_ms)
            calls = []
            for i in range(n):
                idx = rng.permutation(N)[:k].astype(np.int32)
                calls.append((xs[i % 8], w_in, b_in, w_out, b_out, jnp.asarray(idx)))
            u, dn = mlp_config(B, d, k, interpret=_interp(), up=up, down=down)
            fn = lambda x, wi, bi, wo, bo, idx, _u=up, _d=down: selective_mlp(
                x, wi, bi, wo, bo, idx, activation="relu", up_config=_u, down_config=_d)
            try:
                t = time_calls(fn, calls, reps, debug=frac == fractions[0])
            except Exception as err:
                t = {"error": f"{type(err).__name__}: {err}"[:500]}
            row = dict(kind="mlp", method="ours", B=B, d=d, N=N, fraction=frac, k=k, bytes=nbytes,
                       config=dict(up=u, down=dn), **t)
            if "ms" in t:
                row["tbps"] = nbytes / (t["ms"] * 1e-3) / 1e12
            rows.append(row)
            log(_fmt_row(row))
            del calls
        if baselines:
            dense_bytes = 2 * N * d * item
            n = _n_calls(dense_bytes / 2.8e12 * 1e3 + 2 * B * N * d / 4e14 * 1e3, target_ms, hi=40)
            calls = [(jax.random.normal(jax.random.fold_in(k5, 1000 * B + i), (B, d), dt), w_in,
                      b_in, w_out, b_out) for i in range(n)]
            try:
                t = time_calls(_xla_dense_mlp, calls, reps)
            except Exception as err:
                t = {"error": f"{type(err).__name__}: {err}"[:500]}
            row = dict(kind="mlp", method="xla-dense", B=B, d=d, N=N, fraction=1.0, k=N,
                       bytes=dense_bytes, **t)
            if "ms" in t:
                row["tbps"] = dense_bytes / (t["ms"] * 1e-3) / 1e12
            rows.append(row)
            log(_fmt_row(row))
            del calls
            for tr in torch_rows:
                if tr.get("kind") == "mlp" and (tr["B"], tr["d"]) == (B, d):
                    row = dict(kind="mlp", method="torch-cublas", B=B, d=d, N=N, fraction=1.0, k=N,
                               bytes=dense_bytes, **{k_: v_ for k_, v_ in tr.items() if k_ in (
                                   "ms", "ms_min", "ms_max", "how", "error", "n_calls")})
                    if "ms" in row:
                        row["tbps"] = dense_bytes / (row["ms"] * 1e-3) / 1e12
                    rows.append(row)
                    log(_fmt_row(row))
        del xs
    del w_in, w_out
    return rows


# ------------------------------------------------------------------------------------------
# Correctness of the compiled kernels on the device
# ------------------------------------------------------------------------------------------

def run_checks(log=print, small=False):
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import (selective_mlp, selective_mlp_reference, sparse_decode_attention,
                                sparse_decode_attention_reference)

    tol = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    results = []

    def rel(a, b):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if not np.all(np.isfinite(a)):
            return float("inf")
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    def record(name, err, limit, extra=""):
        ok = err <= limit
        results.append(dict(name=name, rel_err=err, tol=limit, ok=bool(ok)))
        log(f"  check {'ok  ' if ok else 'FAIL'} {name:<70} rel {err:.2e} (tol {limit:.0e}) {extra}")

    attn_cases = [
        # B, Hq, Hkv, S, D, k, dtype, window, overrides
        (3, 8, 2, 1000, 128, 2, jnp.float16, None, {}),
        (3, 8, 2, 1000, 128, 1, jnp.float16, 300, dict(num_splits=4)),
        (3, 8, 2, 1000, 128, 2, jnp.float16, None, dict(num_splits=8, combine="xla")),
        (4, 32, 4, 777, 128, 3, jnp.bfloat16, 100, dict(num_splits=2, block_k=128)),
        (2, 4, 4, 513, 64, 2, jnp.float32, None, dict(num_splits=4)),
        (2, 16, 2, 300, 80, 1, jnp.float16, 50, dict(num_warps=8)),
        (5, 16, 16, 2048, 128, 8, jnp.float16, None, {}),
        (1, 32, 8, 8192, 128, 8, jnp.float16, None, {}),
    ]
    mlp_cases = [
        # B, d, N, k, dtype, act, bias, up, down
        (1, 1000, 3000, 300, jnp.float16, "relu", True, None, None),
        (5, 4096, 16384, 1638, jnp.float16, "relu", True, None, None),
        (16, 1000, 3000, 3000, jnp.bfloat16, "gelu", True, None, None),
        (64, 512, 2000, 1, jnp.float16, "gelu_new", True, None, None),
        (256, 1024, 4096, 2048, jnp.float16, "relu", True, None, None),
    ]
    if small:  # interpret mode: only the small cases
        attn_cases = [c for c in attn_cases if c[0] * c[2] * c[3] <= 8000]
        mlp_cases = [c for c in mlp_cases if c[0] * c[2] <= 30000]
    for B, Hq, Hkv, S, D, k, dt, W, over in attn_cases:
        q = jnp.asarray(rng.standard_normal((B, Hq, D)), dt)
        kc = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dt)
        vc = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dt)
        lens = rng.integers(0, S + 1, B)
        lens[0] = 0 if B > 2 else S
        lens[-1] = S
        if B > 3:
            lens[1] = 1
        lens = jnp.asarray(lens, jnp.int32)
        gi = jnp.asarray(np.argsort(rng.random((B, Hkv)), axis=1)[:, :k], jnp.int32)
        try:
            out = sparse_decode_attention(q, kc, vc, lens, gi, sliding_window=W, **over)
            ref = sparse_decode_attention_reference(q, kc, vc, lens, gi, sliding_window=W)
            err = rel(out, ref)
            sel = np.zeros((B, Hkv), bool)
            sel[np.arange(B)[:, None], np.asarray(gi)] = True
            sel &= (np.asarray(lens) > 0)[:, None]
            zero_ok = bool(np.all(np.asarray(out, np.float32).reshape(B, Hkv, -1)[~sel] == 0))
            if not zero_ok:
                err = float("inf")
        except Exception as e:
            err = float("inf")
            log(f"  error: {type(e).__name__}: {str(e)[:400]}")
        record(f"attn B{B} Hq{Hq}/Hkv{Hkv} S{S} D{D} k{k} {jnp.dtype(dt).name} W{W} {over}", err,
               tol[dt])

    for B, d, N, k, dt, act, bias, up, down in mlp_cases:
        x = jnp.asarray(rng.standard_normal((B, d)), dt)
        w_in = jnp.asarray(rng.standard_normal((N, d)) / math.sqrt(d), dt)
        w_out = jnp.asarray(rng.standard_normal((N, d)) / math.sqrt(k), dt)
        b_in = jnp.asarray(rng.standard_normal(N), dt) if bias else None
        b_out = jnp.asarray(rng.standard_normal(d), dt) if bias else None
        idx = jnp.asarray(rng.permutation(N)[:k], jnp.int32)
        try:
            out = selective_mlp(x, w_in, b_in, w_out, b_out, idx, activation=act, up_config=up,
                                down_config=down)
            ref = selective_mlp_reference(x, w_in, b_in, w_out, b_out, idx, activation=act)
            err = rel(out, ref)
        except Exception as e:
            err = float("inf")
            log(f"  error: {type(e).__name__}: {str(e)[:400]}")
        record(f"mlp B{B} d{d} N{N} k{k} {jnp.dtype(dt).name} {act} bias={bias}",
               err, tol[dt])
    return results


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def _fmt_row(r):
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


# ------------------------------------------------------------------------------------------
# Tuning sweep (--sweep): variants of the tiling on representative shapes
# ------------------------------------------------------------------------------------------

ATTN_SWEEP_SHAPES = [((16, 32, 8, 4096), 0.5), ((1, 32, 8, 32768), 1.0)]
ATTN_SWEEP_VARIANTS = [
    {}, dict(num_warps=4), dict(split_factor=0.5), dict(block_k=128), dict(block_k=32),
    dict(split_factor=2),
]
MLP_SWEEP = [(8192, 1, 0.1), (8192, 16, 0.1), (8192, 64, 0.1)]
MLP_SWEEP_VARIANTS = [
    ({}, {}), (dict(split_factor=0.5), {}), ({}, dict(num_warps=8)), (dict(block_n=64), {}),
    ({}, dict(prefetch=True)),
]
MLP_SWEEP_B256 = [(4096, 256, 1.0)]
MLP_SWEEP_VARIANTS_B256 = [
    ({}, {}), (dict(block_m=64, block_n=64, block_d=64, num_warps=4, num_stages=4), {}),
]


def run_sweep(reps, target_ms, log=print):
    from pallas_kernels.selective_mlp import mlp_config
    from pallas_kernels.sparse_attention import attention_config

    rows = []
    for shape, dens in ATTN_SWEEP_SHAPES:
        B, Hq, Hkv, S = shape
        k = max(1, int(round(dens * Hkv)))
        base = attention_config(B, k, S, 128, Hq // Hkv)
        for v in ATTN_SWEEP_VARIANTS:
            over = dict(v)
            f = over.pop("split_factor", None)
            if f is not None:
                over["num_splits"] = max(1, int(base["num_splits"] * f))
                if over["num_splits"] == base["num_splits"]:
                    continue
            r = bench_attention(shape, [dens], reps, target_ms, [], cfg_over=over, baselines=False,
                                log=lambda s: None)[0]
            r["variant"] = v
            rows.append(r)
            log(f"sweep {_fmt_row(r)} {v} -> {r.get('config')}")
    for d, B, frac in MLP_SWEEP + MLP_SWEEP_B256:
        N = 4 * d
        k = max(1, int(round(frac * N)))
        bu, bd = mlp_config(B, d, k)
        for vu, vd in (MLP_SWEEP_VARIANTS_B256 if B > 64 else MLP_SWEEP_VARIANTS):
            up, down = dict(vu), dict(vd)
            fu, fd = up.pop("split_factor", None), down.pop("split_factor", None)
            if fu is not None:
                up["splits"] = max(1, int(bu["splits"] * fu))
            if fd is not None:
                down["splits"] = max(1, int(bd["splits"] * fd))
            if (fu is not None or fd is not None) and up.get("splits") == bu["splits"] \
                    and down.get("splits") == bd["splits"]:
                continue
            r = bench_mlp(d, [B], [frac], reps, target_ms, [], up=up, down=down, baselines=False,
                          log=lambda s: None)[0]
            r["variant"] = [vu, vd]
            rows.append(r)
            log(f"sweep {_fmt_row(r)} {vu} {vd} -> {r.get('config')}")
    return rows


def format_sweep(rows):
    groups = {}
    for r in rows:
        if r["kind"] == "attn":
            key = f"attn B{r['B']} {r['Hq']}/{r['Hkv']} S{r['S']} dens {r['density']}"
        else:
            key = f"mlp d{r['d']} B{r['B']} k/N {r['fraction']}"
        groups.setdefault(key, []).append(r)
    out = ["\nSweep (fastest first; ms, TB/s, variant -> config)"]
    for key, rs in groups.items():
        out.append(key)
        for r in sorted(rs, key=lambda r: r.get("ms", 1e9)):
            ms = f"{r['ms']:.4f}" if "ms" in r else "error"
            tb = f"{r.get('tbps', 0):.2f}"
            cfg = r.get("config", {})
            if r["kind"] == "mlp" and cfg:
                cfg = {"up": {k: v for k, v in cfg["up"].items()},
                       "down": {k: v for k, v in cfg["down"].items()}}
            km = f"{r['kernel_ms']:.4f}" if r.get("kernel_ms") else "-"
            out.append(f"  {ms:>8} {km:>8} {tb:>5} {json.dumps(r.get('variant'))} -> {json.dumps(cfg)}"
                       + (f" ERR {r.get('error', '')[:150]}" if "ms" not in r else ""))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------

def environment():
    import jax
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


def _attn_shape(text: str) -> tuple[int, int, int, int]:
    """An argparse type: "B,Hq,Hkv,S", four integers >= 1 with Hq a multiple of Hkv."""
    shape = cli_list(bench.COUNT)(text)
    if len(shape) != 4 or shape[1] % shape[2]:
        raise argparse.ArgumentTypeError(
            f"must be B,Hq,Hkv,S: four integers >= 1, Hq a multiple of Hkv; got {text!r}")
    return tuple(shape)


def main(argv: list[str] | None = None) -> int:
    # torch runs in a subprocess beside us: do not let XLA take 75% of the GPU up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    p = bench.parser("kernels", __doc__.split("\n\n")[0])
    p.add_argument("--json", type=bench.OUTPUT_FILE, help="write every measurement (and the environment) to this file")
    p.add_argument("--only", choices=["all", "attn", "mlp", "none"], default="all",
                   help="which kernels to time")
    p.add_argument("--reps", type=bench.COUNT, default=5, help="timed repeats; the median is reported")
    p.add_argument("--target-ms", type=cli_type(number, float, low=0, low_open=True), default=4.0,
                   help="aim for this much GPU time per timed repeat (sets calls per jit)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    p.add_argument("--no-check", action="store_true", help="skip the on-device correctness check")
    p.add_argument("--check-only", action="store_true", help="only the correctness check")
    p.add_argument("--sweep", action="store_true", help="also time tiling variants (tuning)")
    p.add_argument("--sweep-only", action="store_true", help="only the tuning sweep")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test, CPU ok)")
    p.add_argument("--d", type=bench.COUNT, nargs="+", help="MLP d values (default 4096 8192)")
    p.add_argument("--attn-shapes", type=_attn_shape, nargs="+",
                   help="attention shapes as B,Hq,Hkv,S (default: the issue's six)")
    args = p.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jax

    t_start = time.time()
    env = environment()
    result = dict(env=env, command="polar-jax bench kernels " + " ".join(argv),
                  rotation_bytes=ROTATION_BYTES)
    print(f"# {env['device']} | jax {env['jax']} | {env['date']} | backend {env['backend']}",
          flush=True)
    gpu = env["backend"] == "gpu"

    if args.quick:
        attn_shapes = QUICK_ATTN_SHAPES
        mlp_d, mlp_b, mlp_f = QUICK_MLP
    else:
        attn_shapes = ATTN_SHAPES
        mlp_d, mlp_b, mlp_f = MLP_DIMS, MLP_BATCHES, MLP_FRACTIONS
    if args.attn_shapes:
        attn_shapes = args.attn_shapes
    if args.d:
        mlp_d = args.d
    do_attn = args.only in ("all", "attn") and not (args.check_only or args.sweep_only)
    do_mlp = args.only in ("all", "mlp") and not (args.check_only or args.sweep_only)

    # 1. torch (subprocess, before JAX allocates much): copy bandwidth and dense baselines.
    torch_rows = []
    if gpu and not args.no_torch and not (args.check_only or args.sweep_only) and _torch_available():
        cases = [dict(kind="copy", bytes=1 << 30, n_calls=10)]
        if do_attn:
            for (B, Hq, Hkv, S) in attn_shapes:
                nb = 2 * B * Hkv * S * 128 * 2
                cases.append(dict(kind="attn", B=B, Hq=Hq, Hkv=Hkv, S=S, D=128,
                                  n_calls=_n_calls(nb / 2.8e12 * 1e3 + 0.004, args.target_ms)))
        if do_mlp:
            for d in mlp_d:
                for B in mlp_b:
                    nb = 2 * 4 * d * d * 2
                    cases.append(dict(kind="mlp", B=B, d=d, N=4 * d, n_calls=_n_calls(
                        nb / 2.8e12 * 1e3 + 2 * B * 4 * d * d / 4e14 * 1e3, args.target_ms, hi=40)))
        t0 = time.time()
        tr = run_torch(cases, args.reps)
        result["torch"] = tr
        torch_rows = tr.get("cases", [])
        print(f"# torch baselines: {tr.get('torch', tr.get('error', '?'))[:300]} "
              f"({time.time() - t0:.0f} s)", flush=True)

    # 2. copy bandwidth
    copy_jax, read_jax = copy_bandwidth_jax(args.reps, (1 << 30) if gpu else (1 << 22))
    result["copy_jax"], result["read_jax"] = copy_jax, read_jax
    copy_torch = next((c.get("tbps") for c in torch_rows if c.get("kind") == "copy"), None)
    result["copy_torch_tbps"] = copy_torch
    copy_tbps = max(x for x in (copy_jax["tbps"], copy_torch or 0.0))
    result["copy_tbps"] = copy_tbps
    print(f"# copy bandwidth (read+write): jax {copy_jax['tbps']:.2f} TB/s, torch "
          f"{copy_torch if copy_torch is None else f'{copy_torch:.2f}'} TB/s -> using {copy_tbps:.2f}; "
          f"jax read-only reduce {read_jax['tbps']:.2f} TB/s", flush=True)

    # 3. correctness of the compiled kernels
    if not args.no_check:
        t0 = time.time()
        print("# correctness of the compiled kernels against the references", flush=True)
        result["checks"] = run_checks(small=not gpu)
        bad = [c for c in result["checks"] if not c["ok"]]
        print(f"# checks: {len(result['checks']) - len(bad)}/{len(result['checks'])} ok "
              f"({time.time() - t0:.0f} s)", flush=True)

    rows = []
    if do_attn:
        for shape in attn_shapes:
            rows += bench_attention(shape, ATTN_DENSITIES, args.reps, args.target_ms, torch_rows)
            jax.clear_caches()
    if do_mlp:
        for d in mlp_d:
            rows += bench_mlp(d, mlp_b, mlp_f, args.reps, args.target_ms, torch_rows)
            jax.clear_caches()
    result["rows"] = rows
    attn_table, mlp_table, targets = evaluate(rows, copy_tbps)
    result["targets"] = targets

    def dump():
        result["seconds"] = round(time.time() - t_start, 1)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1, default=str)

    dump()
    if rows:
        print(format_tables(attn_table, mlp_table, targets, copy_tbps), flush=True)
    if args.sweep or args.sweep_only:
        result["sweep"] = run_sweep(args.reps, args.target_ms)
        print(format_sweep(result["sweep"]), flush=True)
        dump()
    print(f"\n# {env['device']} | jax {env['jax']} | {env['date']} | {result['command']}")
    print(format_tables(attn_table, mlp_table, targets, copy_tbps))
    if "checks" in result:
        bad = [c for c in result["checks"] if not c["ok"]]
        print(f"\nCorrectness on the device: {len(result['checks']) - len(bad)}/{len(result['checks'])} ok"
              + "".join(f"\n  FAIL {c['name']} rel {c['rel_err']:.2e}" for c in bad))
    print(f"# total {result['seconds']} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
