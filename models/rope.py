"""Rotary position embeddings: default, `linear`, `dynamic` (NTK), `llama3` and `longrope`
(Phi-3.x) scaling.

Same convention as Hugging Face Llama: the two halves of a head are rotated as pairs
(`rotate_half`), frequencies computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models import scopes
from models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int, ext_factors=None) -> np.ndarray:
    """`[head_dim // 2]` float32 inverse frequencies before any sequence-dependent scaling
    (`ext_factors`: longrope's per-frequency divisors)."""
    base = rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    if ext_factors is not None:
        base = np.asarray(ext_factors, np.float32) * base
    inv_freq = (1.0 / base).astype(np.float32)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions, rope: RopeConfig, head_dim: int, max_position_embeddings: int):
    """cos, sin `[B, T, head_dim]` (float32) for integer positions `[B, T]`."""
    inv_freq = jnp.asarray(inverse_frequencies(rope, head_dim))
    scale = 1.0
    if rope.rope_type == "longrope":
        # As Hugging Face generating one sequence: the long factors once the sequence (here
        # each row, up to its last position) is longer than the original context.
        short, long = (jnp.asarray(inverse_frequencies(rope, head_dim, f))
                       for f in (rope.short_factor, rope.long_factor))
        beyond = jnp.max(positions, axis=-1) + 1 > rope.original_max_position_embeddings
        inv_freq = jnp.where(beyond[:, None, None], long, short)  # [B, 1, head_dim // 2]
        scale = rope.attention_factor
    if rope.rope_type == "dynamic":
        # NTK-aware: past the trained context the base grows with the longest position seen.
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_position_embeddings).astype(jnp.float32)
        base = rope.theta * (
            rope.factor * seq_len / max_position_embeddings - (rope.factor - 1)
        ) ** (head_dim / (head_dim - 2))
        inv_freq = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


@jax.named_scope(scopes.ROPE)
def apply_rope(x, cos, sin):
    """Rotates x `[B, T, H, D]` by the angles in cos, sin `[B, T, D]`."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
