"""The family registry: every supported `model_type` has one family, an unknown one is
refused naming them all, a record missing a field fails naming it, every `bench decode
--arch` shape parses as its family, and the newer families' configs parse to what
transformers itself reads (layer patterns, rotary bases, longrope, soft-capping)."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from models import config_from_hf
from models.family import Family, Positions
from models.registry import BENCH_SHAPES, BY_MODEL_TYPE, FAMILIES, SUPPORTED_MODEL_TYPES, family
from models.rope import inverse_frequencies
from polar_jax.errors import PolarJaxError


def test_unknown_model_type_is_refused_naming_the_supported_ones():
    with pytest.raises(PolarJaxError) as info:
        config_from_hf({"model_type": "gpt_neox", "hidden_size": 64})
    message = str(info.value)
    assert "\n" not in message and "'model_type'" in message and "gpt_neox" in message
    assert all(t in message for t in SUPPORTED_MODEL_TYPES)
    assert set(SUPPORTED_MODEL_TYPES) == {"opt", "llama", "mistral", "qwen2", "qwen3", "phi3",
                                          "gemma2", "gemma3_text"}


def test_family_missing_a_field_fails_naming_it():
    with pytest.raises(TypeError) as info:
        Family(name="Falcon", model_types=("falcon",), parse_config=lambda f: None,
               model=object, param_specs=lambda c: {}, positions=Positions())
    assert str(info.value) == ("model family 'Falcon' is missing registry field(s) "
                               "param_axes, bench_shapes")


def test_each_model_type_has_one_family_and_bench_shapes_parse_as_it():
    assert sum(len(f.model_types) for f in FAMILIES) == len(BY_MODEL_TYPE)
    for f in FAMILIES:
        for name, hf in f.bench_shapes.items():
            assert family(hf["model_type"]) is f, name
            assert config_from_hf(hf).model_type == hf["model_type"]
    assert {"qwen3-8b", "phi-3-medium", "gemma-2-9b", "gemma-3-12b"} <= set(BENCH_SHAPES)


def test_new_families_parse_as_transformers_reads_them():
    rng = np.random.default_rng()
    window, layers = int(rng.integers(8, 64)), int(rng.integers(7, 14))
    small = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_attention_heads=4,
                 num_key_value_heads=2)
    for hf in (transformers.Gemma2Config(**small, num_hidden_layers=layers, head_dim=12,
                                         sliding_window=window),
               transformers.Gemma3TextConfig(**small, num_hidden_layers=layers, head_dim=12,
                                             sliding_window=window)):
        ours = config_from_hf(hf.to_dict())
        assert list(ours.sliding_windows) == [window if t == "sliding_attention" else None
                                              for t in hf.layer_types]
        assert (ours.attn_logit_softcap, ours.final_logit_softcap) == (
            hf.attn_logit_softcapping, hf.final_logit_softcapping)
        assert ours.query_pre_attn_scalar == hf.query_pre_attn_scalar
    params = hf.rope_parameters  # Gemma 3's, per layer type
    assert (ours.rope.theta, ours.local_rope.theta) == (
        params["full_attention"]["rope_theta"], params["sliding_attention"]["rope_theta"])
    # Qwen3's head_dim is its own (128 unless given), not hidden_size / heads.
    qwen3 = transformers.Qwen3Config(**small, num_hidden_layers=2).to_dict()
    del qwen3["head_dim"]
    assert config_from_hf(qwen3).head_dim == transformers.Qwen3Config(**small).head_dim == 128
    # Phi-3.5's longrope: both frequency sets and the cos/sin scale, as transformers computes
    # them, in the v5 spelling and the older `su` one.
    short, long = (rng.uniform(1, 4, 6).tolist() for _ in range(2))
    phi = transformers.Phi3Config(**small, num_hidden_layers=2, max_position_embeddings=4096,
                                  original_max_position_embeddings=256,
                                  rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                       short_factor=short, long_factor=long))
    ours = config_from_hf(phi.to_dict())
    for factors, length in ((ours.rope.short_factor, 256), (ours.rope.long_factor, 257)):
        inv_freq, scale = ROPE_INIT_FUNCTIONS["longrope"](phi, seq_len=length)
        np.testing.assert_allclose(inverse_frequencies(ours.rope, 12, factors), inv_freq.numpy(),
                                   rtol=1e-6)
        assert ours.rope.attention_factor == pytest.approx(scale) and scale > 1
    legacy = phi.to_dict()
    legacy["rope_scaling"] = dict(legacy.pop("rope_parameters"), type="su")
    del legacy["rope_scaling"]["rope_type"]
    assert config_from_hf(legacy) == ours
