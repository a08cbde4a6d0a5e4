"""Selective (neuron-sparse) MLP for batched decoding as two Pallas kernels.

Polar Sparsity keeps one set of MLP neurons for the whole batch (the union the router predicts
for all rows), so the MLP becomes two gathered GEMMs over the selected rows of the weights:

    h = act(x @ w_in[idx].T + b_in[idx])                   [B, k]   ("up" kernel)
    y = h @ w_out[idx] + b_out                              [B, d]   ("down" kernel)

Gated MLPs (Llama) stay dense: their routers predict no neurons, so there is no gated form.

Both weight matrices are neuron-major `[N, d]`, so a selected neuron is one contiguous row and
both kernels stream whole row segments (at small batch the work is pure memory bandwidth:
`2 * k * d` weight elements).

- up: one program per (batch tile, block of `block_n` selected neurons, d-split); it gathers the
  neuron ids once, then streams `[block_n, block_d]` row tiles of w_in along d with
  a float32 tensor-core dot against the x tile. Bias and activation are fused; h is written in
  `x.dtype`. With several d-splits the last split to finish a tile (atomic counter) sums the
  float32 partials and applies bias and activation.
- down: one program per (batch tile, `block_do` output columns, k-split); it streams
  `[block_kc, block_do]` gathered row segments of w_out against h. With several k-splits the
  last split to finish a tile sums the float32 partials, adds `b_out` and writes y.

The split counts are chosen so that there are enough programs to fill the GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import (
    FLOAT_DTYPES, PROGRAMS_PER_SM, atomic_add, barrier, cdiv, compiler_params, gelu_erf_kernel,
    masked_load, masked_store, next_pow2, pl, resolve_interpret, sm_count,
)
from pallas_kernels.activations import ACTIVATIONS, get_activation

__all__ = ["selective_mlp", "selective_mlp_reference", "mlp_config"]


def _kernel_activation(name: str):
    """The activation as used inside kernels (`lax.erf` has no Triton lowering)."""
    fn = get_activation(name)
    if fn is ACTIVATIONS["gelu"]:
        return gelu_erf_kernel
    return fn


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------

def selective_mlp_reference(x, w_in, b_in, w_out, b_out, neuron_idx, *, activation="relu"):
    """Pure-`jnp` reference: float32 accumulation, h rounded to `x.dtype` between the GEMMs."""
    act = get_activation(activation)
    hp = lax.Precision.HIGHEST
    pre = jnp.dot(x.astype(jnp.float32), w_in[neuron_idx].astype(jnp.float32).T, precision=hp)
    if b_in is not None:
        pre = pre + b_in[neuron_idx].astype(jnp.float32)
    h = act(pre).astype(x.dtype).astype(jnp.float32)
    y = jnp.dot(h, w_out[neuron_idx].astype(jnp.float32), precision=hp)
    if b_out is not None:
        y = y + b_out.astype(jnp.float32)
    return y.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def _pow2_splits(work_units: int, target: int, length: int, min_len: int, cap: int = 64) -> int:
    s = 1
    while work_units * s < target and s < cap and length // (2 * s) >= min_len:
        s *= 2
    return s


def mlp_config(batch, d, k, *, interpret=False, up=None, down=None):
    """Tiles and split counts for the two kernels (dicts; any key may be overridden)."""
    up = dict(up or {})
    down = dict(down or {})
    bm_small = max(16, next_pow2(batch))
    if interpret:
        u = dict(block_m=min(bm_small, 32), block_n=16, block_d=32, splits=1, num_warps=4,
                 num_stages=1)
        dn = dict(block_m=min(bm_small, 32), block_k=16, block_d=32, splits=1, num_warps=4,
                  num_stages=1, prefetch=False)
    else:
        target = PROGRAMS_PER_SM * sm_count()
        if batch <= 64:
            # 32-64 rows: three up stages, the id prefetch and 64 output columns per down
            # program (H200, d 4096, k/N 0.62, B 64: 0.074 -> 0.061 -> 0.057 ms); at B <= 16
            # four stages, no prefetch and 128 columns are faster.
            mid = batch > 16
            u = dict(block_m=bm_small, block_n=32, block_d=128, num_warps=4,
                     num_stages=3 if mid else 4)
            dn = dict(block_m=bm_small, block_k=64, block_d=64 if mid else 128, num_warps=4,
                      num_stages=4, prefetch=mid)
            # Bigger batch tiles make the split-k partials dearer: fewer down splits.
            down_target = target if batch <= 16 else target // 2
        elif cdiv(batch, 128) * cdiv(k, 128) >= sm_count():
            # Large batch and many neurons: tensor-core bound, GEMM-like tiles.
            u = dict(block_m=128, block_n=128, block_d=64, num_warps=8, num_stages=3)
            dn = dict(block_m=64, block_k=64, block_d=128, num_warps=4, num_stages=4,
                      prefetch=True)
            down_target = target // 2
        else:  # large batch, fewer neurons: smaller tiles so that no d-split is needed
            u = dict(block_m=64, block_n=64, block_d=64, num_warps=4, num_stages=4)
            dn = dict(block_m=64, block_k=64, block_d=128, num_warps=4, num_stages=4,
                      prefetch=True)  # large batch: the prefetch keeps the loop pipelined
            down_target = target // 2
        u.update({kk: vv for kk, vv in up.items() if kk != "splits"})
        dn.update({kk: vv for kk, vv in down.items() if kk != "splits"})
        n_bt = cdiv(batch, min(u["block_m"], max(16, next_pow2(batch))))
        u["splits"] = _pow2_splits(n_bt * cdiv(k, u["block_n"]), target, d, 4 * u["block_d"])
        n_bt = cdiv(batch, min(dn["block_m"], max(16, next_pow2(batch))))
        dn["splits"] = _pow2_splits(n_bt * cdiv(d, dn["block_d"]), down_target, k,
                                    4 * dn["block_k"])
    u.update(up)
    dn.update(down)
    for c in (u, dn):
        c["block_m"] = min(max(16, next_pow2(c["block_m"])), max(16, next_pow2(batch)))
        c["splits"] = next_pow2(max(1, int(c["splits"])))
    u["block_n"] = max(16, next_pow2(u["block_n"]))
    u["block_d"] = max(16, next_pow2(u["block_d"]))
    dn["block_k"] = max(16, next_pow2(dn["block_k"]))
    dn["block_d"] = max(16, next_pow2(dn["block_d"]))
    return u, dn


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

def _up_kernel(*refs, B, d, k, BM, BN, BD, NS, n_bt, has_b_in, act, interpret):
    refs = list(refs)
    x_ref, idx_ref, w_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    b_ref = refs.pop(0) if has_b_in else None
    if NS > 1:
        _, h_ref, cnt_ref, p_ref = refs
    else:
        (h_ref,) = refs

    pid = pl.program_id(0)
    bt = pid % n_bt
    rest_id = pid // n_bt
    s = rest_id % NS
    nb = rest_id // NS

    # float32 inputs: a true float32 dot (the Triton default for float32 is TF32).
    prec = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None
    rn = nb * BN + jnp.arange(BN, dtype=jnp.int32)  # positions in idx
    n_ok = rn < k
    nid = masked_load(idx_ref, (rn,), n_ok, 0, interpret=interpret)
    rb = bt * BM + jnp.arange(BM, dtype=jnp.int32)
    b_ok = rb < B
    d_per = cdiv(cdiv(d, NS), BD) * BD
    d0 = s * d_per
    n_chunks = jnp.maximum(jnp.minimum(d - d0, d_per), 0)
    n_chunks = (n_chunks + BD - 1) // BD
    ar_d = jnp.arange(BD, dtype=jnp.int32)
    need_dmask = d % BD != 0

    def body(c, acc):
        cols = d0 + c * BD + ar_d
        xm = b_ok[:, None]
        wm = n_ok[:, None]
        if need_dmask:
            xm = xm & (cols < d)[None, :]
            wm = wm & (cols < d)[None, :]
        xt = masked_load(x_ref, (rb[:, None], cols[None, :]), xm, 0.0, interpret=interpret)
        wt = masked_load(w_ref, (nid[:, None], cols[None, :]), wm, 0.0, interpret=interpret)
        return acc + lax.dot_general(xt, wt, (((1,), (1,)), ((), ())), precision=prec,
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, n_chunks, body, jnp.zeros((BM, BN), jnp.float32))

    def finish(pre):
        if has_b_in:
            pre = pre + masked_load(b_ref, (nid,), n_ok, 0.0,
                                    interpret=interpret).astype(jnp.float32)[None, :]
        masked_store(h_ref, (rb[:, None], rn[None, :]), act(pre).astype(h_ref.dtype),
                     b_ok[:, None] & n_ok[None, :])

    if NS == 1:
        finish(acc)
        return

    tile = nb * n_bt + bt
    pr = bt * BM + jnp.arange(BM, dtype=jnp.int32)  # partial buffers are padded: no masks
    pc = nb * BN + jnp.arange(BN, dtype=jnp.int32)
    p_ref[s, pr[:, None], pc[None, :]] = acc
    barrier(interpret)
    arrived = atomic_add(cnt_ref, (tile,), jnp.int32(1))

    @pl.when(arrived == NS - 1)
    def _():
        # Loads after the acquire-release atomic see the other splits' partials; all splits
        # are loaded at once (in chunks that fit in registers) so their latencies overlap.
        finish(_sum_partials(p_ref, NS, pr, pc, interpret))


def _sum_partials(p_ref, NS, pr, pc, interpret, max_elems=8192):
    """sum_s p_ref[s, pr, pc] as one [CH, R, C] tile load per chunk of CH splits."""
    R, C = pr.shape[0], pc.shape[0]
    CH = max(1, min(NS, max_elems // (R * C)))
    tot = None
    for c0 in range(0, NS, CH):
        sp = c0 + jnp.arange(CH, dtype=jnp.int32)
        t = masked_load(p_ref, (sp[:, None, None], pr[None, :, None], pc[None, None, :]),
                        jnp.ones((CH, R, C), dtype=bool), 0.0, interpret=interpret)
        t = jnp.sum(t, axis=0)
        tot = t if tot is None else tot + t
    return tot


def _down_kernel(*refs, B, d, k, BM, BK, BD, NS, n_bt, n_db, has_b_out, prefetch, interpret):
    refs = list(refs)
    h_ref, idx_ref, w_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    bo_ref = refs.pop(0) if has_b_out else None
    if NS > 1:
        _, y_ref, cnt_ref, p_ref = refs
    else:
        (y_ref,) = refs

    pid = pl.program_id(0)
    bt = pid % n_bt
    rest_id = pid // n_bt
    s = rest_id % NS
    db = rest_id // NS

    rb = bt * BM + jnp.arange(BM, dtype=jnp.int32)
    b_ok = rb < B
    cols = db * BD + jnp.arange(BD, dtype=jnp.int32)
    c_ok = cols < d
    k_per = cdiv(cdiv(k, NS), BK) * BK
    k0 = s * k_per
    k1 = jnp.minimum(k0 + k_per, k)
    n_chunks = (jnp.maximum(k1 - k0, 0) + BK - 1) // BK
    ar_k = jnp.arange(BK, dtype=jnp.int32)
    need_cmask = d % BD != 0

    prec = lax.Precision.HIGHEST if h_ref.dtype == jnp.float32 else None

    def load_ids(c):
        kk = k0 + c * BK + ar_k
        k_ok = kk < k1
        return kk, k_ok, masked_load(idx_ref, (kk,), k_ok, 0, interpret=interpret)

    def step(acc, kk, k_ok, nid):
        ht = masked_load(h_ref, (rb[:, None], kk[None, :]), b_ok[:, None] & k_ok[None, :], 0.0,
                         interpret=interpret)
        wm = k_ok[:, None] & c_ok[None, :] if need_cmask else k_ok[:, None]
        wt = masked_load(w_ref, (nid[:, None], cols[None, :]), wm, 0.0, interpret=interpret)
        return acc + lax.dot_general(ht, wt, (((1,), (0,)), ((), ())), precision=prec,
                                     preferred_element_type=jnp.float32)

    acc0 = jnp.zeros((BM, BD), jnp.float32)
    if prefetch:
        # The neuron ids of chunk c+1 are loaded while chunk c's rows stream in, so the
        # row gather never waits on its own index load.
        def body(c, carry):
            acc, nid = carry
            kk, k_ok, _ = load_ids(c)
            _, _, nid_next = load_ids(c + 1)
            return step(acc, kk, k_ok, nid), nid_next

        acc, _ = lax.fori_loop(0, n_chunks, body, (acc0, load_ids(0)[2]))
    else:
        def body(c, acc):
            kk, k_ok, nid = load_ids(c)
            return step(acc, kk, k_ok, nid)

        acc = lax.fori_loop(0, n_chunks, body, acc0)

    def finish(y):
        if has_b_out:
            y = y + masked_load(bo_ref, (cols,), c_ok, 0.0,
                                interpret=interpret).astype(jnp.float32)[None, :]
        masked_store(y_ref, (rb[:, None], cols[None, :]), y.astype(y_ref.dtype),
                     b_ok[:, None] & c_ok[None, :])

    if NS == 1:
        finish(acc)
        return

    tile = db * n_bt + bt
    p_ref[s, rb[:, None], cols[None, :]] = acc  # padded partial buffer: no masks
    barrier(interpret)
    arrived = atomic_add(cnt_ref, (tile,), jnp.int32(1))

    @pl.when(arrived == NS - 1)
    def _():
        finish(_sum_partials(p_ref, NS, rb, cols, interpret))


def _run_up(x, w_in, b_in, neuron_idx, *, activation, interpret, u):
    """h = act(x @ w_in[idx].T + b_in[idx]), [B, k] in x.dtype."""
    B, d = x.shape
    k = neuron_idx.shape[0]
    full = pl.BlockSpec()
    BM, BN, BD, NS = u["block_m"], u["block_n"], u["block_d"], u["splits"]
    n_bt, n_nb = cdiv(B, BM), cdiv(k, BN)
    kernel = functools.partial(
        _up_kernel, B=B, d=d, k=k, BM=BM, BN=BN, BD=BD, NS=NS, n_bt=n_bt,
        has_b_in=b_in is not None, act=_kernel_activation(activation), interpret=interpret)
    args = [x, neuron_idx, w_in] + ([b_in] if b_in is not None else [])
    h_sds = jax.ShapeDtypeStruct((B, k), x.dtype)
    params = compiler_params(u["num_warps"], u["num_stages"])
    grid = (n_bt * n_nb * NS,)
    if NS == 1:
        return pl.pallas_call(kernel, grid=grid, in_specs=[full] * len(args), out_specs=full,
                              out_shape=h_sds, compiler_params=params, interpret=interpret,
                              name="selective_mlp_up")(*args)
    n_in = len(args)
    p_sds = jax.ShapeDtypeStruct((NS, n_bt * BM, n_nb * BN), jnp.float32)
    outs = pl.pallas_call(
        kernel, grid=grid, in_specs=[full] * (n_in + 1), out_specs=[full] * 3,
        out_shape=[h_sds, jax.ShapeDtypeStruct((n_bt * n_nb,), jnp.int32), p_sds],
        input_output_aliases={n_in: 1}, compiler_params=params, interpret=interpret,
        name="selective_mlp_up_splitd")(*args, jnp.zeros((n_bt * n_nb,), jnp.int32))
    return outs[0]


def _run_down(h, w_out, b_out, neuron_idx, *, interpret, dn):
    """y = h @ w_out[idx] + b_out, [B, d] in h.dtype."""
    B, k = h.shape
    d = w_out.shape[1]
    full = pl.BlockSpec()
    BM, BK, BD, NS = dn["block_m"], dn["block_k"], dn["block_d"], dn["splits"]
    n_bt, n_db = cdiv(B, BM), cdiv(d, BD)
    kernel = functools.partial(
        _down_kernel, B=B, d=d, k=k, BM=BM, BK=BK, BD=BD, NS=NS, n_bt=n_bt, n_db=n_db,
        has_b_out=b_out is not None, prefetch=bool(dn.get("prefetch", False)),
        interpret=interpret)
    args = [h, neuron_idx, w_out] + ([b_out] if b_out is not None else [])
    y_sds = jax.ShapeDtypeStruct((B, d), h.dtype)
    params = compiler_params(dn["num_warps"], dn["num_stages"])
    grid = (n_bt * n_db * NS,)
    if NS == 1:
        return pl.pallas_call(kernel, grid=grid, in_specs=[full] * len(args), out_specs=full,
                              out_shape=y_sds, compiler_params=params, interpret=interpret,
                              name="selective_mlp_down")(*args)
    n_in = len(args)
    outs = pl.pallas_call(
        kernel, grid=grid, in_specs=[full] * (n_in + 1), out_specs=[full] * 3,
        out_shape=[y_sds, jax.ShapeDtypeStruct((n_bt * n_db,), jnp.int32),
                   jax.ShapeDtypeStruct((NS, n_bt * BM, n_db * BD), jnp.float32)],
        input_output_aliases={n_in: 1}, compiler_params=params, interpret=interpret,
        name="selective_mlp_down_splitk")(*args, jnp.zeros((n_bt * n_db,), jnp.int32))
    return outs[0]


@functools.partial(jax.jit, static_argnames=("activation", "interpret", "ucfg", "dcfg"))
def _selective_mlp(x, w_in, b_in, w_out, b_out, neuron_idx, *, activation, interpret, ucfg,
                   dcfg):
    h = _run_up(x, w_in, b_in, neuron_idx, activation=activation, interpret=interpret,
                u=dict(ucfg))
    return _run_down(h, w_out, b_out, neuron_idx, interpret=interpret, dn=dict(dcfg))


# --------------------------------------------------------------------------------------------
# Public wrapper
# --------------------------------------------------------------------------------------------

def _check_args(x, w_in, b_in, w_out, b_out, neuron_idx, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}; supported: "
                         f"{', '.join(sorted(ACTIVATIONS))}")
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be [B, d], got shape {getattr(x, 'shape', None)}")
    B, d = x.shape
    if B < 1 or d < 1:
        raise ValueError(f"x must be non-empty, got shape {x.shape}")
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"x dtype must be float32, bfloat16 or float16, got {x.dtype}")
    if getattr(w_in, "ndim", None) != 2 or w_in.shape[1] != d:
        raise ValueError(f"w_in must be [N, d={d}], got shape {getattr(w_in, 'shape', None)}")
    N = w_in.shape[0]
    if w_out is None:
        raise ValueError("w_out is required")
    if getattr(w_out, "shape", None) != (N, d):
        raise ValueError(f"w_out must be [N={N}, d={d}] (neuron-major), got shape "
                         f"{getattr(w_out, 'shape', None)}")
    for name, w in (("w_in", w_in), ("w_out", w_out)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} dtype {w.dtype} differs from x dtype {x.dtype}")
    for name, bvec, n in (("b_in", b_in, N), ("b_out", b_out, d)):
        if bvec is None:
            continue
        if getattr(bvec, "shape", None) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {getattr(bvec, 'shape', None)}")
        if jnp.dtype(bvec.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float array, got {bvec.dtype}")
    if getattr(neuron_idx, "ndim", None) != 1:
        raise ValueError(f"neuron_idx must be a 1-D int32 array [k], got shape "
                         f"{getattr(neuron_idx, 'shape', None)}")
    if neuron_idx.dtype != jnp.int32:
        raise TypeError(f"neuron_idx must be int32, got {neuron_idx.dtype}")
    k = neuron_idx.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"neuron_idx selects k={k} neurons; need 1 <= k <= N={N}")


def selective_mlp(x, w_in, b_in, w_out, b_out, neuron_idx, *, activation="relu", interpret=None,
                  up_config=None, down_config=None):
    """`act(x @ w_in[idx].T + b_in[idx]) @ w_out[idx] + b_out` over the selected neurons only.

    Args:
      x: `[B, d]`.
      w_in: `[N, d]`, row n = neuron n's input weights (HF `fc1.weight` / `up_proj.weight`).
      b_in: `[N]` or None.
      w_out: `[N, d]`, row n = neuron n's output weights (`fc2.weight.T` / `down_proj.weight.T`).
      b_out: `[d]` or None.
      neuron_idx: int32 `[k]`, distinct neurons in `[0, N)` (one set for the whole batch), any
        order, 1 <= k <= N. Values are not range-checked (that would need a host sync).
      activation: "relu", "gelu", "gelu_new", "silu" (or another name of `ACTIVATIONS`).
      interpret: run the Pallas interpreter (None: when the default backend is the CPU).
      up_config, down_config: optional dicts overriding the tiles / splits (tuning).

    Returns:
      `[B, d]` in `x.dtype`, accumulated in float32.
    """
    _check_args(x, w_in, b_in, w_out, b_out, neuron_idx, activation)
    interpret = resolve_interpret(interpret)
    u, dn = mlp_config(x.shape[0], x.shape[1], neuron_idx.shape[0], interpret=interpret,
                       up=up_config, down=down_config)
    return _selective_mlp(x, w_in, b_in, w_out, b_out, neuron_idx, activation=activation,
                          interpret=interpret,
                          ucfg=tuple(sorted(u.items())), dcfg=tuple(sorted(dn.items())))
