"""Phi-3 and Phi-3.5: the Llama model (`models.llama`) read from a checkpoint that stores
q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`; `longrope` rotary scaling (spelled
`su` or `yarn` by older configs) past the original context; a sliding window on every layer
where config.json sets one. The family's config and Hugging Face mapping."""

from __future__ import annotations

from models import hf_mapping as hfm
from models.config import Fields, gated_decoder_fields, rope_config
from models.family import Family, Positions
from models.llama import LlamaConfig, LlamaModel, top_specs
from polar_jax.errors import PolarJaxError

POSITIONS = Positions(rope_types=("default", "longrope"),
                      rope_aliases={"su": "longrope", "yarn": "longrope"})


def parse_config(fields: Fields) -> LlamaConfig:
    base = gated_decoder_fields(fields, rms_norm_eps=1e-5)
    for where in (fields, fields.nested("rope_parameters"), fields.nested("rope_scaling")):
        if where.has("partial_rotary_factor"):
            partial = where.float("partial_rotary_factor")
            if partial != 1.0:
                raise PolarJaxError(f"{where.name('partial_rotary_factor')} is {partial}; only "
                                    f"1.0 (every dimension rotated) is supported")
    window = fields.int("sliding_window", None)
    return LlamaConfig(
        **base,
        rope=rope_config(fields, base["max_position_embeddings"], base["head_dim"],
                         POSITIONS.rope_types, POSITIONS.rope_aliases),
        sliding_windows=(window,) * base["num_layers"],
    )


def param_specs(c: LlamaConfig) -> hfm.Specs:
    d, n = c.hidden_size, c.mlp_dim
    specs = top_specs(c)
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        specs[f"{hf}.input_layernorm.weight"] = hfm.identity(ours + ("attn_norm", "weight"), (d,))
        specs[f"{hf}.post_attention_layernorm.weight"] = hfm.identity(
            ours + ("mlp_norm", "weight"), (d,))
        specs[f"{hf}.self_attn.qkv_proj.weight"] = hfm.fused_qkv(ours + ("attn", "w_qkv"), c)
        specs[f"{hf}.self_attn.o_proj.weight"] = hfm.out_proj(
            ours + ("attn", "w_o"), d, c.num_heads, c.head_dim)
        specs[f"{hf}.mlp.gate_up_proj.weight"] = hfm.fused_gate_up(ours + ("mlp", "w_gate_up"),
                                                                   n, d)
        specs[f"{hf}.mlp.down_proj.weight"] = hfm.transposed(ours + ("mlp", "w_out"), (d, n))
    return specs


FAMILY = Family(
    name="Phi-3",
    model_types=("phi3",),
    parse_config=parse_config,
    model=LlamaModel,
    param_specs=param_specs,
    param_axes={},
    positions=POSITIONS,
    bench_shapes={
        # Phi-3-medium (14B): 40 query heads over 10 KV groups of 128.
        "phi-3-medium": dict(model_type="phi3", vocab_size=32064, hidden_size=5120,
                             intermediate_size=17920, num_hidden_layers=40,
                             num_attention_heads=40, num_key_value_heads=10,
                             max_position_embeddings=4096, rope_theta=10000.0,
                             rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False),
    },
)
