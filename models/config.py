"""What every family's configuration shares, and the checked reads its parser is built from.

Each family (`models.registry`) parses a Hugging Face `config.json` dict into its own frozen
config, a `ModelConfig`, with `Fields`; one parser serves the converter (reading the source
checkpoint) and the loader (reading the `config.json` a converted directory keeps), so both
agree on every field, and both refuse a field of the wrong type or range in one line that
names it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from pallas_kernels.activations import ACTIVATIONS
from polar_jax import validate
from polar_jax.errors import PolarJaxError

LAYER_TYPES = ("full_attention", "sliding_attention")  # HF `layer_types` (Qwen2/3, Gemma)
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
    # longrope (Phi-3.x): per-frequency divisors up to and past the original length, and the
    # scale of cos and sin
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


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

    @property
    def longrope_switch(self) -> int | None:
        """The length past which longrope's long factors apply (None: no such switch). Hugging
        Face recomputes the cache there and rotates a whole prompt past it with the long
        factors; decoding here refuses to cross it and serving stops before it."""
        return None


_REQUIRED = object()  # a `Fields` default: the field must be present


class Fields:
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

    def nested(self, key: str) -> "Fields":
        """The object at `key` (empty when absent)."""
        return Fields(validate.mapping(self.name(key), self.get(key, {})), self.model_type,
                      f"{self.prefix}{key}.")

    def floats(self, key: str, length: int) -> tuple[float, ...]:
        """A list of `length` finite numbers > 0 (required)."""
        items = validate.listing(self.name(key), self.get(key), length)
        return tuple(validate.number(self.name(f"{key}[{i}]"), item, 0, low_open=True)
                     for i, item in enumerate(items))


def rope_config(fields: Fields, max_positions: int, head_dim: int, types: tuple[str, ...],
                aliases: Mapping[str, str] | None = None, parameters: Fields | None = None,
                default_theta: float = 10000.0) -> RopeConfig:
    """Reads `rope_parameters` (transformers v5) or `rope_scaling` + `rope_theta` (v4): a rope
    type among the family's `types` (`aliases`: older spellings of them). `parameters`: the
    object to read instead of `rope_parameters` (Gemma 3's per layer type)."""
    parameters = fields.nested("rope_parameters") if parameters is None else parameters
    scaling = fields.nested("rope_scaling")

    def source(key: str) -> Fields:
        """The object that spells `key` (v5's wins), so a refusal names where the value is."""
        return next((f for f in (parameters, scaling) if f.has(key)),
                    parameters if parameters.hf else scaling)

    type_key = "rope_type" if source("rope_type").has("rope_type") else "type"
    aliases = aliases or {}
    rope_type = source(type_key).str(type_key, "default", types + tuple(aliases))
    rope_type = aliases.get(rope_type, rope_type)
    low = 4 if rope_type == "dynamic" else 2  # dynamic rope divides by head_dim - 2
    if head_dim % 2 or head_dim < low:
        raise PolarJaxError(
            f"config.json: the head dimension ('head_dim', or 'hidden_size' / "
            f"'num_attention_heads') must be even and >= {low} for {rope_type} rotary "
            f"embeddings, got {head_dim}")
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
    original_positions = (fields if fields.has(original) else source(original)).int(
        original, max_positions)
    longrope = {}
    if rope_type == "longrope":
        # As Hugging Face: the factor defaults to the ratio of the context lengths, and the
        # cos/sin scale to sqrt(1 + ln(factor) / ln(original length)).
        factor = source("factor").float("factor", max_positions / original_positions)
        scale = (math.sqrt(1 + math.log(factor) / math.log(original_positions))
                 if factor > 1 else 1.0)
        longrope = dict(
            short_factor=source("short_factor").floats("short_factor", head_dim // 2),
            long_factor=source("long_factor").floats("long_factor", head_dim // 2),
            attention_factor=source("attention_factor").float("attention_factor", scale))
    return RopeConfig(
        rope_type=rope_type,
        theta=theta.float("rope_theta", default_theta),
        **factors,
        original_max_position_embeddings=original_positions,
        **longrope,
    )


def gated_decoder_fields(fields: Fields, *, head_dim: int | None = None,
                         max_positions: Any = _REQUIRED, activation: str = "hidden_act",
                         default_activation: str = "silu", tie_word_embeddings: bool = False,
                         rms_norm_eps: float = 1e-6) -> dict[str, Any]:
    """The `ModelConfig` fields every rotary, gated-MLP family (Llama, Phi-3, Gemma) reads
    alike from config.json, as keyword arguments: sizes, the attention shape (`attention_shape`,
    `head_dim` the family's default), the MLP and its `activation` key, the tied head and the
    RMSNorm epsilon, each with the family's default."""
    hidden = fields.int("hidden_size")
    layers = fields.int("num_hidden_layers")
    heads, kv_heads, head_dim = attention_shape(fields, hidden, grouped=True, head_dim=head_dim)
    return dict(
        model_type=fields.model_type,
        vocab_size=fields.int("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        mlp_dim=fields.int("intermediate_size"),
        max_position_embeddings=fields.int("max_position_embeddings", max_positions),
        activation=fields.str(activation, default_activation, ACTIVATION_NAMES),
        gated_mlp=True,
        tie_word_embeddings=fields.bool("tie_word_embeddings", tie_word_embeddings),
        rms_norm_eps=fields.float("rms_norm_eps", rms_norm_eps),
    )


def attention_shape(fields: Fields, hidden: int, grouped: bool,
                    head_dim: int | None = None) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim). `grouped` (rotary families): `num_key_value_heads`
    and `head_dim` are read when given; otherwise head_dim is the family's default `head_dim`,
    else hidden_size / num_attention_heads, which must then divide exactly."""
    heads = fields.int("num_attention_heads")
    kv_heads = fields.int("num_key_value_heads", heads) if grouped else heads
    if heads % kv_heads:
        raise PolarJaxError(
            f"config.json: 'num_attention_heads' ({heads}) must be a multiple of "
            f"'num_key_value_heads' ({kv_heads})")
    if grouped and (fields.has("head_dim") or head_dim is not None):
        return heads, kv_heads, fields.int("head_dim", head_dim)
    if hidden % heads:
        raise PolarJaxError(
            f"config.json: 'hidden_size' ({hidden}) must be a multiple of "
            f"'num_attention_heads' ({heads})")
    return heads, kv_heads, hidden // heads


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
