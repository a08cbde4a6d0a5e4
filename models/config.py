"""Frozen model configurations, parsed from a Hugging Face `config.json` dict.

One parser serves the converter (reading the source checkpoint) and the loader (reading the
`config.json` a converted directory keeps), so both agree on every field, and both refuse a
field of the wrong type or range in one line that names it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from pallas_kernels.activations import ACTIVATIONS
from polar_jax import validate
from polar_jax.errors import PolarJaxError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "opt", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Qwen2's `layer_types`
ACTIVATION_NAMES = tuple(sorted(ACTIVATIONS))
# The largest sizes config.json may give, far above any released model's (Llama 3.1 405B: 126
# layers, hidden 16384, 128 heads, 128,256 tokens, 131,072 positions), so that a typo such as
# 1e9 layers is refused in one line instead of growing memory until the OOM killer.
MAX_SIZES = {"num_hidden_layers": 1024, "hidden_size": 1 << 17, "word_embed_proj_dim": 1 << 17,
             "intermediate_size": 1 << 20, "ffn_dim": 1 << 20, "num_attention_heads": 4096,
             "num_key_value_heads": 4096, "head_dim": 4096, "vocab_size": 1 << 23,
             "max_position_embeddings": 1 << 26}


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

    def check_seq_len(self, seq_len: int) -> None:
        """Refuses windows of `seq_len` tokens beyond the model's positions (the positions past
        them read nothing: NaN)."""
        if seq_len > self.max_position_embeddings:
            raise PolarJaxError(
                f"--seq-len {seq_len} exceeds the model's {self.max_position_embeddings} "
                f"positions (max_position_embeddings); lower --seq-len")


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


_REQUIRED = object()  # a `_Fields` default: the field must be present


class _Fields:
    """Type- and range-checked reads of a config.json object, or of an object nested in it
    (`prefix` names it); a null value counts as absent. Each refusal names the field:
    "config.json: 'num_hidden_layers' must be an integer >= 1, got -2"."""

    def __init__(self, hf: Mapping[str, Any], model_type: str, prefix: str = ""):
        self.hf, self.model_type, self.prefix = hf, model_type, prefix

    def name(self, key: str) -> str:
        return f"config.json: '{self.prefix}{key}'"

    def has(self, key: str) -> bool:
        return self.hf.get(key) is not None

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """The raw value, `default` when absent (refused when there is no default)."""
        if self.has(key):
            return self.hf[key]
        if default is _REQUIRED:
            raise PolarJaxError(
                f"config.json has no '{self.prefix}{key}', which a {self.model_type} model needs")
        return default

    def int(self, key: str, default: Any = _REQUIRED, low: int = 1) -> int:
        """An integer >= `low`, at most `MAX_SIZES[key]` for a size."""
        if not self.has(key):
            return self.get(key, default)
        return validate.integer(self.name(key), self.hf[key], low, MAX_SIZES.get(key))

    def float(self, key: str, default: Any = _REQUIRED) -> float:
        """A finite number > 0."""
        if not self.has(key):
            return self.get(key, default)
        return validate.number(self.name(key), self.hf[key], 0, low_open=True)

    def bool(self, key: str, default: bool) -> bool:
        return validate.boolean(self.name(key), self.get(key, default))

    def str(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        return validate.string(self.name(key), self.get(key, default), choices)

    def strs(self, key: str, default: list[str], length: int, choices: tuple[str, ...]) -> list[str]:
        """A list of `length` strings, each one of `choices`."""
        items = validate.listing(self.name(key), self.get(key, default), length)
        return [validate.string(self.name(f"{key}[{i}]"), item, choices) for i, item in enumerate(items)]

    def nested(self, key: str) -> "_Fields":
        """The object at `key` (empty when absent)."""
        return _Fields(validate.mapping(self.name(key), self.get(key, {})), self.model_type,
                       f"{self.prefix}{key}.")


def _rope_config(fields: _Fields, max_positions: int) -> RopeConfig:
    """Reads `rope_parameters` (transformers v5) or `rope_scaling` + `rope_theta` (v4)."""
    parameters, scaling = fields.nested("rope_parameters"), fields.nested("rope_scaling")

    def source(key: str) -> _Fields:
        """The object that spells `key` (v5's wins), so a refusal names where the value is."""
        return next((f for f in (parameters, scaling) if f.has(key)),
                    parameters if parameters.hf else scaling)

    type_key = "rope_type" if source("rope_type").has("rope_type") else "type"
    rope_type = source(type_key).str(type_key, "default", ROPE_TYPES)
    required = rope_type == "llama3"
    factors = {key: source(key).float(key, _REQUIRED if required else default)
               for key, default in (("factor", 1.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0))}
    if required and factors["high_freq_factor"] <= factors["low_freq_factor"]:
        raise PolarJaxError(
            f"config.json: llama3 rope 'high_freq_factor' must exceed 'low_freq_factor', got "
            f"{factors['high_freq_factor']} and {factors['low_freq_factor']}")
    if fields.has("rope_theta"):  # checked even where rope_parameters' value wins
        fields.float("rope_theta")
    theta = source("rope_theta") if source("rope_theta").has("rope_theta") else fields
    original = "original_max_position_embeddings"
    return RopeConfig(
        rope_type=rope_type,
        theta=theta.float("rope_theta", 10000.0),
        **factors,
        original_max_position_embeddings=(fields if fields.has(original) else source(original))
        .int(original, max_positions),
    )


def _sliding_windows(fields: _Fields, num_layers: int) -> tuple[int | None, ...]:
    """Per layer, the attention window (None: full attention)."""
    if fields.model_type not in ("mistral", "qwen2"):
        return (None,) * num_layers
    window = fields.int("sliding_window", None)
    if fields.model_type == "mistral":
        return (window,) * num_layers
    max_window_layers = fields.int("max_window_layers", num_layers, low=0)
    layer_types = fields.strs("layer_types", [
        "sliding_attention" if i >= max_window_layers else "full_attention"
        for i in range(num_layers)], num_layers, LAYER_TYPES)
    if not fields.bool("use_sliding_window", False) or window is None:
        return (None,) * num_layers
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _attention_shape(fields: _Fields, hidden: int, grouped: bool) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim). `grouped` (the Llama family): `num_key_value_heads`
    and `head_dim` are read when given; otherwise head_dim = hidden_size / num_attention_heads,
    which must then divide exactly."""
    heads = fields.int("num_attention_heads")
    kv_heads = fields.int("num_key_value_heads", heads) if grouped else heads
    if heads % kv_heads:
        raise PolarJaxError(
            f"config.json: 'num_attention_heads' ({heads}) must be a multiple of "
            f"'num_key_value_heads' ({kv_heads})")
    if grouped and fields.has("head_dim"):
        return heads, kv_heads, fields.int("head_dim")
    if hidden % heads:
        raise PolarJaxError(
            f"config.json: 'hidden_size' ({hidden}) must be a multiple of "
            f"'num_attention_heads' ({heads})")
    return heads, kv_heads, hidden // heads


def _llama_config(fields: _Fields) -> LlamaConfig:
    model_type = fields.model_type
    hidden = fields.int("hidden_size")
    layers = fields.int("num_hidden_layers")
    heads, kv_heads, head_dim = _attention_shape(fields, hidden, grouped=True)
    max_positions = fields.int("max_position_embeddings")
    rope = _rope_config(fields, max_positions)
    low = 4 if rope.rope_type == "dynamic" else 2  # dynamic rope divides by head_dim - 2
    if head_dim % 2 or head_dim < low:
        raise PolarJaxError(
            f"config.json: the head dimension ('head_dim', or 'hidden_size' / "
            f"'num_attention_heads') must be even and >= {low} for {rope.rope_type} rotary "
            f"embeddings, got {head_dim}")
    attention_bias = fields.bool("attention_bias", model_type == "qwen2")
    return LlamaConfig(
        model_type=model_type,
        vocab_size=fields.int("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        mlp_dim=fields.int("intermediate_size"),
        max_position_embeddings=max_positions,
        activation=fields.str("hidden_act", "silu", ACTIVATION_NAMES),
        gated_mlp=True,
        tie_word_embeddings=fields.bool("tie_word_embeddings", False),
        rms_norm_eps=fields.float("rms_norm_eps", 1e-6),
        rope=rope,
        attention_bias=attention_bias,
        # Llama puts `attention_bias` on o_proj too; Qwen2 and Mistral never bias o_proj.
        out_proj_bias=attention_bias and model_type == "llama",
        mlp_bias=fields.bool("mlp_bias", False),
        sliding_windows=_sliding_windows(fields, layers),
    )


def _opt_config(fields: _Fields) -> OPTConfig:
    hidden = fields.int("hidden_size")
    heads, _, head_dim = _attention_shape(fields, hidden, grouped=False)
    pre_ln = fields.bool("do_layer_norm_before", True)
    return OPTConfig(
        model_type="opt",
        vocab_size=fields.int("vocab_size"),
        hidden_size=hidden,
        num_layers=fields.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        mlp_dim=fields.int("ffn_dim"),
        max_position_embeddings=fields.int("max_position_embeddings"),
        activation=fields.str("activation_function", "relu", ACTIVATION_NAMES),
        gated_mlp=False,
        tie_word_embeddings=fields.bool("tie_word_embeddings", True),
        word_embed_proj_dim=fields.int("word_embed_proj_dim", hidden),
        do_layer_norm_before=pre_ln,
        enable_bias=fields.bool("enable_bias", True),
        layer_norm_elementwise_affine=fields.bool("layer_norm_elementwise_affine", True),
        final_layer_norm=pre_ln and not fields.bool("_remove_final_layer_norm", False),
    )


def eos_token_ids(sources: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[int, ...]:
    """The end-of-sequence ids of the first of `sources` ((file name, its JSON object):
    generation_config.json's, then config.json's) that gives `eos_token_id` (none: ()), each an
    integer >= 0, refused in one line naming the file."""
    for name, settings in sources:
        eos = settings.get("eos_token_id")
        if eos is not None:
            label = f"{name}: 'eos_token_id'"
            ids = validate.listing(label, eos) if isinstance(eos, (list, tuple)) else [eos]
            return tuple(validate.integer(label, i, low=0) for i in ids)
    return ()


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Parses a Hugging Face `config.json` dict into the family's frozen config, checking the
    type and range of every field it reads."""
    validate.mapping("config.json", hf)
    model_type = validate.string("config.json: 'model_type'", hf.get("model_type"),
                                 SUPPORTED_MODEL_TYPES)
    fields = _Fields(hf, model_type)
    return _opt_config(fields) if model_type == "opt" else _llama_config(fields)
