"""The pieces each family's Hugging Face weight mapping is built from.

A family's `param_specs(config)` lists, for every HF tensor name a checkpoint must hold, a
`ParamSpec`: the path of the parameter in the model's state, the HF shape, and the transform
from HF's `nn.Linear` `[out, in]` layout to ours (q/k/v by KV group `[d, Hkv, G + 2, D]`, the
output projection `[H, D, d]`, neuron-major MLP `[N, d]`, gate and up `[N, 2, d]`). The
converter (`convert/`) reads checkpoints through these specs and knows no family.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from models.config import ModelConfig

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """`path` in the model; the HF shape; the layout change. For tensors stored together
    (q/k/v, gate/up), `part` is where this one goes in the parameter of shape `full_shape`."""

    path: Path
    hf_shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] = lambda w: w
    part: tuple | None = None
    full_shape: tuple[int, ...] | None = None

    def into(self, part: tuple, full_shape: tuple[int, ...]) -> "ParamSpec":
        return dataclasses.replace(self, part=part, full_shape=tuple(full_shape))


Specs = dict[str, ParamSpec]  # HF tensor name -> its spec

# Tensors a checkpoint may hold that no model needs: rotary caches of old Llama checkpoints
# and OPT's attention masks.
IGNORED = re.compile(r"(.*\.rotary_emb\.inv_freq|.*\.attn\.masked_bias|.*\.attn\.bias)$")


def identity(path: Path, shape) -> ParamSpec:
    return ParamSpec(path, tuple(shape))


def transposed(path: Path, shape) -> ParamSpec:
    """HF `[out, in]` -> ours `[in, out]` (also `down_proj`/`fc2` `[d, N]` -> neuron-major `[N, d]`)."""
    return ParamSpec(path, tuple(shape), lambda w: w.T)


def _in_proj(path: Path, d: int, heads: int, head_dim: int) -> ParamSpec:
    """q/k/v weight `[H*D, d]` -> `[d, H, D]`."""
    return ParamSpec(path, (heads * head_dim, d),
                     lambda w: w.reshape(heads, head_dim, d).transpose(2, 0, 1))


def _in_bias(path: Path, heads: int, head_dim: int) -> ParamSpec:
    return ParamSpec(path, (heads * head_dim,), lambda b: b.reshape(heads, head_dim))


def attention(specs: Specs, prefix: str, path: Path, c: ModelConfig, qkv_bias: bool,
              out_bias: bool, out_name: str) -> None:
    """q, k, v into `w_qkv [d, Hkv, G + 2, D]`, grouped by KV head (G = Hq / Hkv): group j holds
    its query heads `jG ... jG + G - 1` at `[:, j, :G]`, its key at `[:, j, G]`, its value at
    `[:, j, G + 1]`; so a shard of KV groups carries its query heads with it."""
    d, hq, hkv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    g = hq // hkv
    full = (d, hkv, g + 2, hd)
    q = _in_proj(path + ("w_qkv",), d, hq, hd)
    specs[f"{prefix}.q_proj.weight"] = dataclasses.replace(
        q, transform=lambda w, t=q.transform: t(w).reshape(d, hkv, g, hd)).into(
        (slice(None), slice(None), slice(0, g)), full)
    for name, at in (("k", g), ("v", g + 1)):
        specs[f"{prefix}.{name}_proj.weight"] = _in_proj(path + ("w_qkv",), d, hkv, hd).into(
            (slice(None), slice(None), at), full)
    if qkv_bias:
        qb = _in_bias(path + ("b_qkv",), hq, hd)
        specs[f"{prefix}.q_proj.bias"] = dataclasses.replace(
            qb, transform=lambda b, t=qb.transform: t(b).reshape(hkv, g, hd)).into(
            (slice(None), slice(0, g)), full[1:])
        for name, at in (("k", g), ("v", g + 1)):
            specs[f"{prefix}.{name}_proj.bias"] = _in_bias(path + ("b_qkv",), hkv, hd).into(
                (slice(None), at), full[1:])
    specs[f"{prefix}.{out_name}.weight"] = out_proj(path + ("w_o",), d, hq, hd)
    if out_bias:
        specs[f"{prefix}.{out_name}.bias"] = identity(path + ("b_o",), (d,))


def out_proj(path: Path, d: int, heads: int, head_dim: int) -> ParamSpec:
    """o weight `[d, H*D]` -> `[H, D, d]`."""
    return ParamSpec(path, (d, heads * head_dim),
                     lambda w: w.reshape(d, heads, head_dim).transpose(1, 2, 0))


def fused_qkv(path: Path, c: ModelConfig) -> ParamSpec:
    """One `qkv_proj` weight `[(Hq + 2 Hkv) D, d]` (queries, keys, values) -> `w_qkv
    [d, Hkv, G + 2, D]` grouped by KV head, as `attention` places the three apart."""
    d, hq, hkv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    g = hq // hkv

    def transform(w):
        q, k, v = np.split(w, [hq * hd, (hq + hkv) * hd])
        grouped = np.concatenate([q.reshape(hkv, g, hd, d), k.reshape(hkv, 1, hd, d),
                                  v.reshape(hkv, 1, hd, d)], axis=1)
        return grouped.transpose(3, 0, 1, 2)

    return ParamSpec(path, ((hq + 2 * hkv) * hd, d), transform)


def gate_up(specs: Specs, prefix: str, path: Path, n: int, d: int, bias: bool) -> None:
    """`gate_proj` and `up_proj` `[N, d]` into `w_gate_up [N, 2, d]` (and their biases)."""
    for at, name in enumerate(("gate_proj", "up_proj")):
        specs[f"{prefix}.{name}.weight"] = identity(path + ("w_gate_up",), (n, d)).into(
            (slice(None), at), (n, 2, d))
        if bias:
            specs[f"{prefix}.{name}.bias"] = identity(path + ("b_gate_up",), (n,)).into(
                (slice(None), at), (n, 2))


def fused_gate_up(path: Path, n: int, d: int) -> ParamSpec:
    """One `gate_up_proj` weight `[2N, d]` (the gate's rows, then the up's) -> `[N, 2, d]`."""
    return ParamSpec(path, (2 * n, d), lambda w: w.reshape(2, n, d).transpose(1, 0, 2))
