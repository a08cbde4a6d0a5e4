"""Where each Hugging Face tensor goes in our models, with its expected shape and layout change.

`param_specs(config)` lists, for every HF tensor name a checkpoint must hold, the path of the
parameter in the model's state, the HF shape, and the transform from HF's `nn.Linear`
`[out, in]` layout to ours (per-head `[d, H, D]` / `[H, D, d]`, neuron-major MLP `[N, d]`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from models.config import LlamaConfig, ModelConfig, OPTConfig

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


def _identity(path: Path, shape) -> ParamSpec:
    return ParamSpec(path, tuple(shape))


def _transposed(path: Path, shape) -> ParamSpec:
    """HF `[out, in]` -> ours `[in, out]` (also `down_proj`/`fc2` `[d, N]` -> neuron-major `[N, d]`)."""
    return ParamSpec(path, tuple(shape), lambda w: w.T)


def _in_proj(path: Path, d: int, heads: int, head_dim: int) -> ParamSpec:
    """q/k/v weight `[H*D, d]` -> `[d, H, D]`."""
    return ParamSpec(path, (heads * head_dim, d),
                     lambda w: w.reshape(heads, head_dim, d).transpose(2, 0, 1))


def _in_bias(path: Path, heads: int, head_dim: int) -> ParamSpec:
    return ParamSpec(path, (heads * head_dim,), lambda b: b.reshape(heads, head_dim))


def _out_proj(path: Path, d: int, heads: int, head_dim: int) -> ParamSpec:
    """o weight `[d, H*D]` -> `[H, D, d]`."""
    return ParamSpec(path, (d, heads * head_dim),
                     lambda w: w.reshape(d, heads, head_dim).transpose(1, 2, 0))


def _attention(specs, prefix: str, path: Path, c: ModelConfig, qkv_bias: bool, out_bias: bool,
               out_name: str):
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
    specs[f"{prefix}.{out_name}.weight"] = _out_proj(path + ("w_o",), d, hq, hd)
    if out_bias:
        specs[f"{prefix}.{out_name}.bias"] = _identity(path + ("b_o",), (d,))


def _llama_specs(c: LlamaConfig) -> dict[str, ParamSpec]:
    d, n = c.hidden_size, c.mlp_dim
    specs = {"model.embed_tokens.weight": _identity(("embed", "embedding"), (c.vocab_size, d)),
             "model.norm.weight": _identity(("final_norm", "weight"), (d,))}
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = _identity(("lm_head", "embedding"), (c.vocab_size, d))
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        specs[f"{hf}.input_layernorm.weight"] = _identity(ours + ("attn_norm", "weight"), (d,))
        specs[f"{hf}.post_attention_layernorm.weight"] = _identity(ours + ("mlp_norm", "weight"), (d,))
        _attention(specs, f"{hf}.self_attn", ours + ("attn",), c, c.attention_bias,
                   c.out_proj_bias, "o_proj")
        mlp = ours + ("mlp",)
        for g, name in enumerate(("gate_proj", "up_proj")):  # w_gate_up [N, 2, d]
            specs[f"{hf}.mlp.{name}.weight"] = _identity(mlp + ("w_gate_up",), (n, d)).into(
                (slice(None), g), (n, 2, d))
            if c.mlp_bias:
                specs[f"{hf}.mlp.{name}.bias"] = _identity(mlp + ("b_gate_up",), (n,)).into(
                    (slice(None), g), (n, 2))
        specs[f"{hf}.mlp.down_proj.weight"] = _transposed(mlp + ("w_out",), (d, n))
        if c.mlp_bias:
            specs[f"{hf}.mlp.down_proj.bias"] = _identity(mlp + ("b_out",), (d,))
    return specs


def _opt_specs(c: OPTConfig) -> dict[str, ParamSpec]:
    d, n, e = c.hidden_size, c.mlp_dim, c.word_embed_proj_dim
    top = "model.decoder"
    specs = {
        f"{top}.embed_tokens.weight": _identity(("embed", "embedding"), (c.vocab_size, e)),
        f"{top}.embed_positions.weight": _identity(
            ("pos_embed", "embedding"), (c.max_position_embeddings + c.position_offset, d)),
    }
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = _identity(("lm_head", "embedding"), (c.vocab_size, e))
    if e != d:
        specs[f"{top}.project_in.weight"] = _transposed(("project_in",), (d, e))
        specs[f"{top}.project_out.weight"] = _transposed(("project_out",), (e, d))
    affine, bias = c.layer_norm_elementwise_affine, c.enable_bias

    def norm(hf: str, path: Path):
        if affine:
            specs[f"{hf}.weight"] = _identity(path + ("weight",), (d,))
            specs[f"{hf}.bias"] = _identity(path + ("bias",), (d,))

    if c.final_layer_norm:
        norm(f"{top}.final_layer_norm", ("final_norm",))
    for i in range(c.num_layers):
        hf, ours = f"{top}.layers.{i}", ("layers", i)
        norm(f"{hf}.self_attn_layer_norm", ours + ("attn_norm",))
        norm(f"{hf}.final_layer_norm", ours + ("mlp_norm",))
        _attention(specs, f"{hf}.self_attn", ours + ("attn",), c, bias, bias, "out_proj")
        mlp = ours + ("mlp",)
        specs[f"{hf}.fc1.weight"] = _identity(mlp + ("w_in",), (n, d))
        specs[f"{hf}.fc2.weight"] = _transposed(mlp + ("w_out",), (d, n))
        if bias:
            specs[f"{hf}.fc1.bias"] = _identity(mlp + ("b_in",), (n,))
            specs[f"{hf}.fc2.bias"] = _identity(mlp + ("b_out",), (d,))
    return specs


def param_specs(config: ModelConfig) -> dict[str, ParamSpec]:
    """HF tensor name -> where and how it is stored, for every tensor the model needs."""
    return _opt_specs(config) if isinstance(config, OPTConfig) else _llama_specs(config)


# Tensors a checkpoint may hold that the model does not need: rotary caches of old Llama
# checkpoints, and a tied `lm_head` saved next to the embedding it equals.
_IGNORED = re.compile(r"(.*\.rotary_emb\.inv_freq|.*\.attn\.masked_bias|.*\.attn\.bias)$")


def canonical_name(name: str, config: ModelConfig) -> str | None:
    """Maps checkpoint names of base-model saves (`decoder.…`, `layers.…`) onto the
    causal-LM names `param_specs` uses; None for tensors that are safely ignored."""
    if _IGNORED.match(name):
        return None
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None
    if isinstance(config, OPTConfig):
        if name.startswith("decoder."):
            return "model." + name
    elif not name.startswith(("model.", "lm_head.")):
        return "model." + name
    return name
