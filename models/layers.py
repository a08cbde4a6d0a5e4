"""Building blocks shared by every family: norms, embeddings, attention and MLP.

Weights are stored in the layouts the decode kernels read and that shard per head and per
neuron: the q/k/v projections together, by KV group, `[d, Hkv, Hq / Hkv + 2, head_dim]`, the output projection
`[heads, head_dim, d]`, MLP weights neuron-major `[N, d]` (row n holds neuron n's input, or
output, weights; a gated MLP's gate and up rows together `[N, 2, d]`).
Matmuls accumulate in float32; norms and softmax run in float32. Each projection takes the
`matmul` that computes it (`xla_matmul` unless the ops choose a kernel: `models.ops`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models import scopes
from pallas_kernels.activations import get_activation

F32 = jnp.float32
ONE_PASS_NORM_ROWS = 8  # LayerNorm of at most this many rows: mean and mean square in one pass


def xla_matmul(x, w, *, contract: int = 1, layout: str = "kn"):
    """x `[..., *c]` against w `[*c, *n]` (layout "kn") or `[*n, *c]` ("nk"), c the last
    `contract` dims of x -> float32 `[..., *n]` (XLA's dot)."""
    xc = tuple(range(x.ndim - contract, x.ndim))
    wc = tuple(range(contract)) if layout == "kn" else tuple(range(w.ndim - contract, w.ndim))
    return jax.lax.dot_general(x, w, ((xc, wc), ((), ())), preferred_element_type=F32)


Matmul = Callable[..., jax.Array]  # `xla_matmul`'s signature


def _param(shape, dtype, fill: float = 0.0):
    """A parameter of `shape`; its values are placeholders until a checkpoint is loaded."""
    return nnx.Param(jnp.full(shape, fill, dtype))


def _maybe(flag: bool, shape, dtype, fill: float = 0.0):
    """`_param(...)` when the checkpoint has this tensor, else None."""
    return _param(shape, dtype, fill) if flag else None


class RMSNorm(nnx.Module):
    """`x / rms(x) * (offset + weight)` over the last axis, in float32 (Gemma stores the
    scale less one: `offset` 1)."""

    def __init__(self, dim: int, eps: float, dtype, offset: float = 0.0):
        self.weight = _param((dim,), dtype, 1.0 - offset)
        self.eps = eps
        self.offset = offset

    @jax.named_scope(scopes.NORM)
    def __call__(self, x):
        x32 = x.astype(F32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.weight[...].astype(F32)
        if self.offset:
            scale = scale + self.offset
        return (scale * x32).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, dtype, affine: bool = True, eps: float = 1e-5):
        self.weight = _maybe(affine, (dim,), dtype, 1.0)
        self.bias = _maybe(affine, (dim,), dtype)
        self.eps = eps

    @jax.named_scope(scopes.NORM)
    def __call__(self, x):
        x32 = x.astype(F32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        if math.prod(x.shape[:-1]) <= ONE_PASS_NORM_ROWS:
            # Mean and mean square side by side, one reduction kernel: XLA splits each of the
            # two-pass form's reductions of one row over blocks (H200, opt-6.7b, one row: the
            # norms of a layer 8.75 -> 5.76 us). From 16 rows on it runs the two-pass form as
            # one kernel, faster than the one-pass form's two (4.34 against 6.32 us at 16 rows).
            var = jnp.maximum(jnp.mean(x32 * x32, axis=-1, keepdims=True) - mean * mean, 0.0)
        else:
            var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight[...].astype(F32) + self.bias[...].astype(F32)
        return y.astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding `[V, d]`; `attend` gives logits against it (tied heads)."""

    def __init__(self, num: int, dim: int, dtype):
        self.embedding = _param((num, dim), dtype)

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)

    @jax.named_scope(scopes.LOGITS)
    def attend(self, x):
        return jnp.einsum("...d,vd->...v", x, self.embedding[...], preferred_element_type=F32)


class Attention(nnx.Module):
    """Q/K/V and output projections; the attention itself is the ops' (`models.ops`).

    Q, K and V are one weight `w_qkv [d, Hkv, G + 2, D]` (G = Hq / Hkv), grouped by KV head:
    group j holds its G query heads, then its key, then its value. The three projections are
    one matmul, which streams the weights faster than three at decode's small batch, and a
    shard of KV groups holds everything its heads need. The output projection is
    `w_o [Hq, D, d]`, query head h of group h // G."""

    def __init__(self, d: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype,
                 qkv_bias: bool, out_bias: bool):
        self.group_size = num_heads // num_kv_heads
        shape = (num_kv_heads, self.group_size + 2, head_dim)
        self.w_qkv = _param((d, *shape), dtype)
        self.b_qkv = _maybe(qkv_bias, shape, dtype)
        self.w_o = _param((num_heads, head_dim, d), dtype)
        self.b_o = _maybe(out_bias, (d,), dtype)

    @jax.named_scope(scopes.QKV_PROJ)
    def project_qkv(self, x, matmul: Matmul = xla_matmul):
        """x `[..., d]` -> q `[..., Hq, D]`, k and v `[..., Hkv, D]`."""
        y = matmul(x, self.w_qkv[...])
        if self.b_qkv is not None:
            y = y + self.b_qkv[...].astype(F32)
        y = y.astype(x.dtype)
        g = self.group_size
        q = y[..., :g, :].reshape(*y.shape[:-3], -1, y.shape[-1])
        return q, y[..., g, :], y[..., g + 1, :]

    @jax.named_scope(scopes.OUT_PROJ)
    def project_out(self, o, matmul: Matmul = xla_matmul):
        """o `[..., Hq, D]` -> `[..., d]`."""
        y = matmul(o, self.w_o[...], contract=2)
        if self.b_o is not None:
            y = y + self.b_o[...].astype(F32)
        return y.astype(o.dtype)


class MLP(nnx.Module):
    """`act(x @ w_in.T + b_in) @ w_out + b_out`, or the gated form `act(x @ w_gate.T + b_gate) *
    (x @ w_up.T + b_up) @ w_out + b_out` with gate and up stored together, neuron-major, as
    `w_gate_up [N, 2, d]` (one matmul; a neuron's two rows adjacent)."""

    def __init__(self, d: int, n: int, dtype, activation: str, gated: bool, bias: bool):
        self.w_gate_up = _maybe(gated, (n, 2, d), dtype)
        self.b_gate_up = _maybe(gated and bias, (n, 2), dtype)
        self.w_in = _maybe(not gated, (n, d), dtype)
        self.b_in = _maybe(bias and not gated, (n,), dtype)
        self.w_out = _param((n, d), dtype)
        self.b_out = _maybe(bias, (d,), dtype)
        self.activation = activation

    def activations(self, x, matmul: Matmul = xla_matmul):
        """The neuron activations `[..., N]` (float32), what the MLP router learns to predict."""
        act = get_activation(self.activation)
        if self.w_gate_up is None:
            h = matmul(x, self.w_in[...], layout="nk")
            return act(h if self.b_in is None else h + self.b_in[...].astype(F32))
        h = matmul(x, self.w_gate_up[...], layout="nk")
        if self.b_gate_up is not None:
            h = h + self.b_gate_up[...].astype(F32)
        return act(h[..., 0]) * h[..., 1]

    def project_out(self, h, dtype, matmul: Matmul = xla_matmul):
        """Neuron activations `[..., N]` -> `[..., d]` in `dtype`."""
        y = matmul(h.astype(dtype), self.w_out[...])
        if self.b_out is not None:
            y = y + self.b_out[...].astype(F32)
        return y.astype(dtype)

    @jax.named_scope(scopes.MLP)
    def __call__(self, x, matmul: Matmul = xla_matmul):
        return self.project_out(self.activations(x, matmul), x.dtype, matmul)


def positions_from_mask(attention_mask):
    """Position ids `[B, T]` counted over the real tokens of each row (padding anywhere)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
