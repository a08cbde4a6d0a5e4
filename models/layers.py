"""Building blocks shared by every family: norms, embeddings, attention and MLP.

Weights are stored in the layouts the decode kernels read and that shard per head and per
neuron: the q/k/v projections together `[d, Hq + 2 Hkv, head_dim]`, the output projection
`[heads, head_dim, d]`, MLP weights neuron-major `[N, d]` (row n holds neuron n's input, or
output, weights; a gated MLP's gate and up rows together `[N, 2, d]`).
Matmuls accumulate in float32; norms and softmax run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import scopes
from pallas_kernels._common import NEG_INF
from pallas_kernels.activations import get_activation
from pallas_kernels.kv_write import write_kv_token, write_kv_token_reference
from pallas_kernels.sparse_attention import sparse_decode_attention

F32 = jnp.float32


def _param(shape, dtype, fill: float = 0.0):
    """A parameter of `shape`; its values are placeholders until a checkpoint is loaded."""
    return nnx.Param(jnp.full(shape, fill, dtype))


def _maybe(flag: bool, shape, dtype, fill: float = 0.0):
    """`_param(...)` when the checkpoint has this tensor, else None."""
    return _param(shape, dtype, fill) if flag else None


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = _param((dim,), dtype, 1.0)
        self.eps = eps

    @jax.named_scope(scopes.NORM)
    def __call__(self, x):
        x32 = x.astype(F32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(F32) * x32).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, dtype, affine: bool = True, eps: float = 1e-5):
        self.weight = _maybe(affine, (dim,), dtype, 1.0)
        self.bias = _maybe(affine, (dim,), dtype)
        self.eps = eps

    @jax.named_scope(scopes.NORM)
    def __call__(self, x):
        x32 = x.astype(F32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
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
    """Q/K/V and output projections; the attention itself is `causal_attention`.

    Q, K and V are one weight `w_qkv [d, Hq + 2 Hkv, D]` (heads of q, then k, then v), so the
    three projections are one matmul, which streams the weights faster than three at decode's
    small batch."""

    def __init__(self, d: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype,
                 qkv_bias: bool, out_bias: bool):
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        heads = num_heads + 2 * num_kv_heads
        self.w_qkv = _param((d, heads, head_dim), dtype)
        self.b_qkv = _maybe(qkv_bias, (heads, head_dim), dtype)
        self.w_o = _param((num_heads, head_dim, d), dtype)
        self.b_o = _maybe(out_bias, (d,), dtype)

    @jax.named_scope(scopes.QKV_PROJ)
    def project_qkv(self, x):
        """x `[..., d]` -> q `[..., Hq, D]`, k and v `[..., Hkv, D]`."""
        y = jnp.einsum("...d,dhk->...hk", x, self.w_qkv[...], preferred_element_type=F32)
        if self.b_qkv is not None:
            y = y + self.b_qkv[...].astype(F32)
        y = y.astype(x.dtype)
        hq, hkv = self.num_heads, self.num_kv_heads
        return y[..., :hq, :], y[..., hq:hq + hkv, :], y[..., hq + hkv:, :]

    @jax.named_scope(scopes.OUT_PROJ)
    def project_out(self, o):
        """o `[..., Hq, D]` -> `[..., d]`."""
        y = jnp.einsum("...hk,hkd->...d", o, self.w_o[...], preferred_element_type=F32)
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

    def hidden(self, x):
        """The neuron activations `[..., N]` (float32), what the MLP router learns to predict."""
        act = get_activation(self.activation)
        if self.w_gate_up is None:
            h = jnp.einsum("...d,nd->...n", x, self.w_in[...], preferred_element_type=F32)
            return act(h if self.b_in is None else h + self.b_in[...].astype(F32))
        h = jnp.einsum("...d,ngd->...ng", x, self.w_gate_up[...], preferred_element_type=F32)
        if self.b_gate_up is not None:
            h = h + self.b_gate_up[...].astype(F32)
        return act(h[..., 0]) * h[..., 1]

    def project_out(self, h, dtype):
        """Neuron activations `[..., N]` -> `[..., d]` in `dtype`."""
        y = jnp.einsum("...n,nd->...d", h.astype(dtype), self.w_out[...], preferred_element_type=F32)
        if self.b_out is not None:
            y = y + self.b_out[...].astype(F32)
        return y.astype(dtype)

    @jax.named_scope(scopes.MLP)
    def __call__(self, x):
        return self.project_out(self.hidden(x), x.dtype)


def causal_attention(q, k, v, key_valid, window: int | None = None, scale: float | None = None):
    """Causal softmax attention over one sequence block, grouped-query aware.

    q `[B, T, Hq, D]`; k, v `[B, T, Hkv, D]`; key_valid `[B, T]` (False at padding).
    Query i sees key j when j <= i, key j is valid and, with a window W, i - j < W.
    Returns `[B, T, Hq, D]` in q's dtype; rows with no visible key hold unspecified values.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=F32) * scale
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    visible = j <= i
    if window is not None:
        visible = visible & (i - j < window)
    visible = visible[None] & key_valid[:, None, :].astype(bool)
    scores = jnp.where(visible[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=F32)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def positions_from_mask(attention_mask):
    """Position ids `[B, T]` counted over the real tokens of each row (padding anywhere)."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def decode_attention(q, k_cache, v_cache, lengths, window: int | None = None,
                     scale: float | None = None):
    """One query token per sequence against its KV cache (dense, XLA).

    q `[B, Hq, D]`; k_cache, v_cache `[B, Hkv, S, D]`; row b attends to cache positions
    `[max(0, lengths[b] - window), lengths[b])`. Returns `[B, Hq, D]`, zero where lengths is 0.
    Same contract as `pallas_kernels.sparse_decode_attention` with all groups selected.
    """
    b, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    scale = d**-0.5 if scale is None else scale
    q = q.reshape(b, hkv, hq // hkv, d)
    scores = jnp.einsum("bkgd,bksd->bkgs", q, k_cache, preferred_element_type=F32) * scale
    pos = jnp.arange(s)[None, :]
    visible = pos < lengths[:, None]
    if window is not None:
        visible = visible & (pos >= lengths[:, None] - window)
    scores = jnp.where(visible[:, None, None, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bkgs,bksd->bkgd", probs.astype(v_cache.dtype), v_cache,
                   preferred_element_type=F32)
    o = jnp.where((lengths > 0)[:, None, None, None], o, 0.0)
    return o.reshape(b, hq, d).astype(q.dtype)


# Attention modes: `attend(q, k, v, kv, window) -> (o, kv)` with q `[B, T, Hq, D]`, k, v
# `[B, T, Hkv, D]` and the layer's cache `kv` (a (k, v) pair of `[B, Hkv, S, D]`, or None).


def full_attention(q, k, v, kv, window, *, key_valid):
    """Causal attention over the given tokens; their K/V are written to `kv[:, :, :T]` if given."""
    if kv is not None:
        kv = tuple(jax.lax.dynamic_update_slice(c, x.swapaxes(1, 2).astype(c.dtype), (0, 0, 0, 0))
                   for c, x in zip(kv, (k, v)))
    return causal_attention(q, k, v, key_valid, window), kv


@jax.named_scope(scopes.KV_WRITE)
def write_token(kv, k, v, positions):
    """The cache pair `kv` with each row's new k, v `[B, 1, Hkv, D]` written at `positions [B]`
    (every group: later tokens may select any): one Pallas kernel on a GPU, XLA's scatter
    elsewhere."""
    write = write_kv_token if jax.default_backend() == "gpu" else write_kv_token_reference
    return write(kv[0], kv[1], k[:, 0], v[:, 0], positions)


def cached_attention(q, k, v, kv, window, *, positions):
    """One new token per sequence (T = 1): written at `positions [B]`, then attends the cache."""
    kv = write_token(kv, k, v, positions)
    if jax.default_backend() == "gpu":  # the Pallas kernel, all groups: reads only up to each length
        o = sparse_decode_attention(q[:, 0], kv[0], kv[1], positions + 1, sliding_window=window)
    else:
        o = decode_attention(q[:, 0], kv[0], kv[1], positions + 1, window)
    return o[:, None], kv


def init_kv_cache(config, batch: int, length: int, dtype):
    """Per layer, a zeroed (k, v) pair of `[batch, kv_heads, length, head_dim]`."""
    shape = (batch, config.num_kv_heads, length, config.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)]


class DenseOps:
    """How every block runs its attention and MLP: densely, attention by the mode `attend`.

    Blocks call `attention(layer, u, q, k, v, kv, window)` and `mlp(layer, u, x, mlp)`, where
    u `[B, T, d]` is the layer's attention input (the output of its first norm), the vector
    routers read. Routing, recording and sparse execution are subclasses: one block
    definition serves evaluation, prefill, decode, router data collection and sparsity.
    The parts of a step run under `jax.named_scope`s (`norm`, `qkv_proj`, `attention`,
    `kv_write`, `out_proj`, `mlp`, ...; see `models.scopes`) so that a profile
    attributes each kernel to its part.
    """

    def __init__(self, attend):
        self.attend = attend

    @jax.named_scope(scopes.ATTENTION)
    def attention(self, layer: int, u, q, k, v, kv, window):
        return self.attend(q, k, v, kv, window)

    def mlp(self, layer: int, u, x, mlp: MLP):
        return mlp(x)
