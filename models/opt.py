"""OPT: learned positions (offset 2), LayerNorm before (pre-LN) or after (post-LN, as
opt-350m) each sublayer, optional `project_in`/`project_out` around a narrower embedding,
biases, the activation named by `activation_function`, tied (or untied) `lm_head`. The
family's config, model and Hugging Face mapping."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from models import hf_mapping as hfm
from models.causal_lm import CausalLM
from models.config import ACTIVATION_NAMES, Fields, ModelConfig, attention_shape
from models.family import Family, Positions
from models.layers import F32, MLP, Attention, Embedding, LayerNorm, _param
from models.ops import Ops

POSITIONS = Positions(learned_offset=2)  # OPT's learned positions are stored shifted by 2 (a
# fairseq legacy)


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
        return POSITIONS.learned_offset


def parse_config(fields: Fields) -> OPTConfig:
    hidden = fields.int("hidden_size")
    heads, _, head_dim = attention_shape(fields, hidden, grouped=False)
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


class OPTBlock(nnx.Module):
    def __init__(self, config: OPTConfig, layer: int, dtype):
        c = config
        self.layer = layer
        affine = c.layer_norm_elementwise_affine
        self.attn_norm = LayerNorm(c.hidden_size, dtype, affine)
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, dtype,
                              qkv_bias=c.enable_bias, out_bias=c.enable_bias)
        self.mlp_norm = LayerNorm(c.hidden_size, dtype, affine)
        self.mlp = MLP(c.hidden_size, c.mlp_dim, dtype, c.activation, gated=False, bias=c.enable_bias)
        self.pre_ln = c.do_layer_norm_before

    def __call__(self, x, shared, ops: Ops, kv):
        """x `[B, T, d]`; OPT's blocks share nothing beyond it (`shared` is None)."""
        u = self.attn_norm(x) if self.pre_ln else x
        route = ops.route(layer=self.layer, u=u)
        q, k, v = self.attn.project_qkv(u, ops.matmul)
        o, kv, attn_record = ops.attention(layer=self.layer, route=route, q=q, k=k, v=v, kv=kv,
                                           window=None, logit_softcap=None)
        x = x + self.attn.project_out(o, ops.matmul)
        if not self.pre_ln:
            x = self.attn_norm(x)
        y, mlp_record = ops.mlp(layer=self.layer, route=route,
                                x=self.mlp_norm(x) if self.pre_ln else x, mlp=self.mlp)
        x = x + y
        return (x if self.pre_ln else self.mlp_norm(x)), kv, attn_record | mlp_record


def _project(x, w):
    """x `[..., a]` @ w `[a, b]`, accumulated in float32, in x's dtype."""
    return jnp.einsum("...a,ab->...b", x, w[...], preferred_element_type=F32).astype(x.dtype)


class OPTModel(CausalLM):
    def __init__(self, config: OPTConfig, dtype=jnp.float32):
        c = config
        self.config = config
        self.embed = Embedding(c.vocab_size, c.word_embed_proj_dim, dtype)
        self.pos_embed = Embedding(c.max_position_embeddings + c.position_offset, c.hidden_size, dtype)
        projected = c.word_embed_proj_dim != c.hidden_size
        self.project_in = _param((c.word_embed_proj_dim, c.hidden_size), dtype) if projected else None
        self.project_out = _param((c.hidden_size, c.word_embed_proj_dim), dtype) if projected else None
        self.layers = nnx.List([OPTBlock(c, i, dtype) for i in range(c.num_layers)])
        affine = c.layer_norm_elementwise_affine
        self.final_norm = LayerNorm(c.hidden_size, dtype, affine) if c.final_layer_norm else None
        self.lm_head = None if c.tie_word_embeddings else Embedding(c.vocab_size, c.word_embed_proj_dim, dtype)

    def embed_inputs(self, tokens, positions):
        x = self.embed(tokens)
        if self.project_in is not None:
            x = _project(x, self.project_in)
        return x + self.pos_embed(positions + self.config.position_offset), None

    def final(self, x):
        """`[B, T, d]` -> the final hidden states `[B, T, word_embed_proj_dim]`."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x if self.project_out is None else _project(x, self.project_out)


def param_specs(c: OPTConfig) -> hfm.Specs:
    d, n, e = c.hidden_size, c.mlp_dim, c.word_embed_proj_dim
    top = "model.decoder"
    specs = {
        f"{top}.embed_tokens.weight": hfm.identity(("embed", "embedding"), (c.vocab_size, e)),
        f"{top}.embed_positions.weight": hfm.identity(
            ("pos_embed", "embedding"), (c.max_position_embeddings + c.position_offset, d)),
    }
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = hfm.identity(("lm_head", "embedding"), (c.vocab_size, e))
    if e != d:
        specs[f"{top}.project_in.weight"] = hfm.transposed(("project_in",), (d, e))
        specs[f"{top}.project_out.weight"] = hfm.transposed(("project_out",), (e, d))
    affine, bias = c.layer_norm_elementwise_affine, c.enable_bias

    def norm(hf: str, path: hfm.Path):
        if affine:
            specs[f"{hf}.weight"] = hfm.identity(path + ("weight",), (d,))
            specs[f"{hf}.bias"] = hfm.identity(path + ("bias",), (d,))

    if c.final_layer_norm:
        norm(f"{top}.final_layer_norm", ("final_norm",))
    for i in range(c.num_layers):
        hf, ours = f"{top}.layers.{i}", ("layers", i)
        norm(f"{hf}.self_attn_layer_norm", ours + ("attn_norm",))
        norm(f"{hf}.final_layer_norm", ours + ("mlp_norm",))
        hfm.attention(specs, f"{hf}.self_attn", ours + ("attn",), c, bias, bias, "out_proj")
        mlp = ours + ("mlp",)
        specs[f"{hf}.fc1.weight"] = hfm.identity(mlp + ("w_in",), (n, d))
        specs[f"{hf}.fc2.weight"] = hfm.transposed(mlp + ("w_out",), (d, n))
        if bias:
            specs[f"{hf}.fc1.bias"] = hfm.identity(mlp + ("b_in",), (n,))
            specs[f"{hf}.fc2.bias"] = hfm.identity(mlp + ("b_out",), (d,))
    return specs


_OPT = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048,
            activation_function="relu", do_layer_norm_before=True)

FAMILY = Family(
    name="OPT",
    model_types=("opt",),
    parse_config=parse_config,
    model=OPTModel,
    param_specs=param_specs,
    # learned positions stay replicated; the embedding projections too
    param_axes={"pos_embed/embedding": ("positions", "embed"),
                "project_in": ("embed", "embed"), "project_out": ("embed", "embed")},
    positions=POSITIONS,
    bench_shapes={
        "tiny": dict(_OPT, vocab_size=512, hidden_size=64, ffn_dim=256, num_hidden_layers=2,
                     num_attention_heads=4),
        "opt-6.7b": dict(_OPT, hidden_size=4096, ffn_dim=16384, num_hidden_layers=32,
                         num_attention_heads=32),
        "opt-13b": dict(_OPT, hidden_size=5120, ffn_dim=20480, num_hidden_layers=40,
                        num_attention_heads=40),
        "opt-30b": dict(_OPT, hidden_size=7168, ffn_dim=28672, num_hidden_layers=48,
                        num_attention_heads=56),
    },
)
