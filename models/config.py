"""Frozen model configurations, parsed from a Hugging Face `config.json` dict.

One parser serves the converter (reading the source checkpoint) and the loader (reading the
`config.json` a converted directory keeps), so both agree on every field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pallas_kernels.activations import ACTIVATIONS
from polar_jax.errors import PolarJaxError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "opt", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings (Hugging Face `rope_parameters` / `rope_scaling`)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What every family shares; the sparsity machinery reads only these fields."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_position_embeddings: int
    activation: str
    gated_mlp: bool
    tie_word_embeddings: bool

    @property
    def group_size(self) -> int:
        """Query heads per KV group (G)."""
        return self.num_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    """Llama 2/3, Qwen2 and Mistral."""

    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    attention_bias: bool = False  # q/k/v (and, for Llama, o) projection biases
    out_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention


@dataclasses.dataclass(frozen=True)
class OPTConfig(ModelConfig):
    """OPT (pre-LN and post-LN)."""

    word_embed_proj_dim: int = 0
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    final_layer_norm: bool = True

    @property
    def position_offset(self) -> int:
        """OPT's learned positions are stored shifted by 2 (a fairseq legacy)."""
        return 2


def _require(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise PolarJaxError(f"config.json has no {key!r}, which a {hf.get('model_type')} model needs")
    return hf[key]


def _rope_config(hf: dict[str, Any]) -> RopeConfig:
    """Reads `rope_parameters` (transformers v5) or `rope_scaling` + `rope_theta` (v4)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise PolarJaxError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    factor = float(params.get("factor", 1.0))
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise PolarJaxError(f"llama3 rope scaling needs {key!r} in rope_parameters")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            hf.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings")
            or hf["max_position_embeddings"]
        ),
    )


def _sliding_windows(hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    model_type = hf["model_type"]
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return (window,) * num_layers
    if model_type == "qwen2":
        if not hf.get("use_sliding_window") or window is None:
            return (None,) * num_layers
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", num_layers) else "full_attention"
            for i in range(num_layers)
        ]
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (None,) * num_layers


def _llama_config(hf: dict[str, Any]) -> LlamaConfig:
    hidden = _require(hf, "hidden_size")
    heads = _require(hf, "num_attention_heads")
    layers = _require(hf, "num_hidden_layers")
    model_type = hf["model_type"]
    attention_bias = bool(hf.get("attention_bias", model_type == "qwen2"))
    return LlamaConfig(
        model_type=model_type,
        vocab_size=_require(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        mlp_dim=_require(hf, "intermediate_size"),
        max_position_embeddings=_require(hf, "max_position_embeddings"),
        activation=hf.get("hidden_act", "silu"),
        gated_mlp=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=_rope_config(hf),
        attention_bias=attention_bias,
        # Llama puts `attention_bias` on o_proj too; Qwen2 and Mistral never bias o_proj.
        out_proj_bias=attention_bias and model_type == "llama",
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_windows=_sliding_windows(hf, layers),
    )


def _opt_config(hf: dict[str, Any]) -> OPTConfig:
    hidden = _require(hf, "hidden_size")
    heads = _require(hf, "num_attention_heads")
    pre_ln = bool(hf.get("do_layer_norm_before", True))
    return OPTConfig(
        model_type="opt",
        vocab_size=_require(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=_require(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        mlp_dim=_require(hf, "ffn_dim"),
        max_position_embeddings=_require(hf, "max_position_embeddings"),
        activation=hf.get("activation_function", "relu"),
        gated_mlp=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        word_embed_proj_dim=hf.get("word_embed_proj_dim") or hidden,
        do_layer_norm_before=pre_ln,
        enable_bias=bool(hf.get("enable_bias", True)),
        layer_norm_elementwise_affine=bool(hf.get("layer_norm_elementwise_affine", True)),
        final_layer_norm=pre_ln and not hf.get("_remove_final_layer_norm", False),
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Parses a Hugging Face `config.json` dict into the family's frozen config."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PolarJaxError(
            f"unsupported model_type {model_type!r}; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    config = _opt_config(hf) if model_type == "opt" else _llama_config(hf)
    if config.num_heads % config.num_kv_heads:
        raise PolarJaxError(
            f"num_attention_heads ({config.num_heads}) must be a multiple of "
            f"num_key_value_heads ({config.num_kv_heads})"
        )
    if config.activation not in ACTIVATIONS:
        raise PolarJaxError(
            f"unsupported activation {config.activation!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    return config
