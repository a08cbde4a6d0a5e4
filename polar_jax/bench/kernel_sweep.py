"""`polar-jax bench kernels --sweep`: variants of the kernels' tiling on representative
shapes, timed as the kernels are (tuning; the defaults in `attention_config` and `mlp_config`
came from it)."""

from __future__ import annotations

import json

from pallas_kernels.selective_mlp import mlp_config
from pallas_kernels.sparse_attention import attention_config
from polar_jax.bench.kernels import HEAD_DIM, bench_attention, bench_mlp, format_row

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


def run_sweep(reps, target_ms, log=print) -> list[dict]:
    """A row per tiling variant (its "variant" beside the config it gave) that differs from
    the default."""
    rows = []
    for shape, dens in ATTN_SWEEP_SHAPES:
        B, Hq, Hkv, S = shape
        k = max(1, int(round(dens * Hkv)))
        base = attention_config(B, k, S, HEAD_DIM, Hq // Hkv)
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
            log(f"sweep {format_row(r)} {v} -> {r.get('config')}")
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
            log(f"sweep {format_row(r)} {vu} {vd} -> {r.get('config')}")
    return rows


def format_sweep(rows) -> str:
    """The sweep's rows by shape, fastest first."""
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
