"""config.json checking: every field `config_from_hf` reads is refused in one line naming the
field when its type or range is wrong, the good spellings Hugging Face writes still parse to
what transformers itself reads, and `polar-jax convert` turns a refusal into exit 2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models import config_from_hf
from polar_jax.cli import main
from polar_jax.errors import PolarJaxError

LLAMA = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-5, hidden_act="silu",
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
QWEN2 = dict(LLAMA, model_type="qwen2", use_sliding_window=True, sliding_window=16,
             max_window_layers=1, layer_types=["full_attention", "sliding_attention"])
PHI3 = dict(LLAMA, model_type="phi3", max_position_embeddings=256,
            original_max_position_embeddings=64,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "short_factor": [1.0] * 4, "long_factor": [2.0] * 4})
GEMMA2 = dict(LLAMA, model_type="gemma2", head_dim=8, hidden_activation="gelu_pytorch_tanh",
              query_pre_attn_scalar=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
OPT = dict(model_type="opt", vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
           num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
           do_layer_norm_before=True, activation_function="relu")

# (base, changes, the field the message must name, a word of what is allowed). A change of
# None deletes the key.
BAD = {
    "negative layers": (LLAMA, dict(num_hidden_layers=-2), "'num_hidden_layers'", "in [1, 1024], got -2"),
    "a billion layers": (LLAMA, dict(num_hidden_layers=10**9), "'num_hidden_layers'",
                         "in [1, 1024], got 1000000000"),
    "layers 1e9": (OPT, dict(num_hidden_layers=1e9), "'num_hidden_layers'", "integer"),
    "a million heads": (OPT, dict(num_attention_heads=2**20), "'num_attention_heads'", "[1, 4096]"),
    "huge vocabulary": (LLAMA, dict(vocab_size=10**12), "'vocab_size'", "[1, 8388608]"),
    "huge hidden": (OPT, dict(hidden_size=2**40), "'hidden_size'", "[1, 131072]"),
    "huge mlp": (LLAMA, dict(intermediate_size=2**31), "'intermediate_size'", "[1, 1048576]"),
    "huge positions": (LLAMA, dict(max_position_embeddings=2**40), "'max_position_embeddings'",
                       "[1, 67108864]"),
    "zero heads": (LLAMA, dict(num_attention_heads=0), "'num_attention_heads'", "[1, 4096]"),
    "string size": (OPT, dict(hidden_size="32"), "'hidden_size'", "integer"),
    "float size": (LLAMA, dict(intermediate_size=64.0), "'intermediate_size'", "integer"),
    "bool size": (OPT, dict(vocab_size=True), "'vocab_size'", "integer"),
    "list size": (LLAMA, dict(max_position_embeddings=[64]), "'max_position_embeddings'", "integer"),
    "negative ffn": (OPT, dict(ffn_dim=-1), "'ffn_dim'", "[1, 1048576]"),
    "zero kv heads": (LLAMA, dict(num_key_value_heads=0), "'num_key_value_heads'", "[1, 4096]"),
    "kv heads not dividing": (LLAMA, dict(num_key_value_heads=3), "'num_key_value_heads'", "multiple"),
    "more kv heads than heads": (LLAMA, dict(num_key_value_heads=8), "'num_key_value_heads'", "multiple"),
    "hidden not divisible": (OPT, dict(hidden_size=30), "'hidden_size'", "multiple"),
    "odd head dim": (LLAMA, dict(head_dim=7), "'head_dim'", "even"),
    "string head dim": (LLAMA, dict(head_dim="8"), "'head_dim'", "integer"),
    "zero projection": (OPT, dict(word_embed_proj_dim=0), "'word_embed_proj_dim'", "[1, 131072]"),
    "missing field": (OPT, dict(ffn_dim=None), "'ffn_dim'", "opt"),
    "unknown model type": (LLAMA, dict(model_type="gpt2"), "'model_type'", "qwen2"),
    "model type not a string": (LLAMA, dict(model_type=["llama"]), "'model_type'", "one of"),
    "rope theta a string": (LLAMA, dict(rope_parameters={"rope_theta": "big"}),
                            "'rope_parameters.rope_theta'", "finite number > 0"),
    "rope theta nan": (LLAMA, dict(rope_parameters=None, rope_theta=float("nan")), "'rope_theta'", "finite"),
    "rope theta zero": (LLAMA, dict(rope_parameters={"rope_theta": 0}), "rope_theta'", "> 0"),
    "top-level rope theta a string beside rope_parameters": (LLAMA, dict(rope_theta="abc"),
                                                             "'rope_theta'", "got 'abc'"),
    "rope parameters a list": (LLAMA, dict(rope_parameters=[10000.0]), "'rope_parameters'", "mapping"),
    "rope scaling a string": (LLAMA, dict(rope_parameters=None, rope_scaling="linear"),
                              "'rope_scaling'", "mapping"),
    "unknown rope type": (LLAMA, dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
                          "'rope_parameters.rope_type'", "llama3"),
    "legacy rope type key": (LLAMA, dict(rope_parameters=None, rope_scaling={"type": "su"}),
                             "'rope_scaling.type'", "dynamic"),
    "negative rope factor": (LLAMA, dict(rope_parameters={"rope_type": "linear", "factor": -4.0}),
                             "'rope_parameters.factor'", "> 0"),
    "infinite rope factor": (LLAMA, dict(rope_parameters={"rope_type": "dynamic", "factor": math.inf}),
                             "'rope_parameters.factor'", "finite"),
    "llama3 without low factor": (LLAMA, dict(rope_parameters={**LLAMA3_ROPE, "low_freq_factor": None}),
                                  "'rope_parameters.low_freq_factor'", "llama"),
    "llama3 factors crossed": (LLAMA, dict(rope_parameters={**LLAMA3_ROPE, "high_freq_factor": 1.0}),
                               "'high_freq_factor'", "exceed"),
    "llama3 original length": (LLAMA, dict(rope_parameters={**LLAMA3_ROPE,
                                                            "original_max_position_embeddings": -32}),
                               "'rope_parameters.original_max_position_embeddings'", ">= 1"),
    "negative eps": (LLAMA, dict(rms_norm_eps=-1e-5), "'rms_norm_eps'", "> 0"),
    "eps a string": (LLAMA, dict(rms_norm_eps="1e-5"), "'rms_norm_eps'", "finite number"),
    "flag a string": (LLAMA, dict(tie_word_embeddings="false"), "'tie_word_embeddings'", "true or false"),
    "flag an int": (OPT, dict(do_layer_norm_before=1), "'do_layer_norm_before'", "true or false"),
    "bias flag a list": (LLAMA, dict(attention_bias=[True]), "'attention_bias'", "true or false"),
    "unknown activation": (OPT, dict(activation_function="tanh"), "'activation_function'", "gelu"),
    "activation not a string": (LLAMA, dict(hidden_act=1), "'hidden_act'", "silu"),
    "zero window": (QWEN2, dict(sliding_window=0), "'sliding_window'", ">= 1"),
    "window a string": (dict(LLAMA, model_type="mistral"), dict(sliding_window="4096"),
                        "'sliding_window'", "integer"),
    "layer types too short": (QWEN2, dict(layer_types=["full_attention"]), "'layer_types'", "2 items"),
    "layer types a string": (QWEN2, dict(layer_types="sliding_attention"), "'layer_types'", "list"),
    "unknown layer type": (QWEN2, dict(layer_types=["full_attention", "local"]), "'layer_types[1]'",
                           "sliding_attention"),
    "negative window layers": (QWEN2, dict(max_window_layers=-1), "'max_window_layers'", ">= 0"),
    "sliding flag a string": (QWEN2, dict(use_sliding_window="yes"), "'use_sliding_window'", "true"),
    "partial rotary": (PHI3, dict(partial_rotary_factor=0.75), "'partial_rotary_factor'", "only 1.0"),
    "longrope factors too short": (PHI3, dict(rope_parameters={**PHI3["rope_parameters"],
                                                               "short_factor": [1.0] * 3}),
                                   "'rope_parameters.short_factor'", "4 items"),
    "longrope factor negative": (PHI3, dict(rope_parameters={**PHI3["rope_parameters"],
                                                             "long_factor": [2.0, -1.0, 2.0, 2.0]}),
                                 "'rope_parameters.long_factor[1]'", "> 0"),
    "phi3 llama3 rope": (PHI3, dict(rope_parameters=LLAMA3_ROPE), "'rope_parameters.rope_type'",
                         "longrope"),
    "negative softcap": (GEMMA2, dict(attn_logit_softcapping=-1.0), "'attn_logit_softcapping'", "> 0"),
    "softcap a string": (GEMMA2, dict(final_logit_softcapping="30"), "'final_logit_softcapping'",
                         "finite number"),
    "zero pre-attention scalar": (GEMMA2, dict(query_pre_attn_scalar=0), "'query_pre_attn_scalar'",
                                  "> 0"),
    "bidirectional gemma": (dict(GEMMA2, model_type="gemma3_text"),
                            dict(use_bidirectional_attention=True),
                            "'use_bidirectional_attention'", "causal"),
    "gemma3 layer type unknown": (dict(GEMMA2, model_type="gemma3_text"),
                                  dict(layer_types=["global", "full_attention"]),
                                  "'layer_types[0]'", "sliding_attention"),
}


def _edited(base: dict, changes: dict) -> dict:
    config = json.loads(json.dumps(base))  # a deep copy, as config.json would give it
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    return config


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_field_is_named_in_one_line(case):
    base, changes, field, allowed = BAD[case]
    hf = _edited(base, changes)
    before = json.dumps(hf)
    with pytest.raises(PolarJaxError) as info:
        config_from_hf(hf)
    message = str(info.value)
    assert "\n" not in message and "config.json" in message
    assert field in message and allowed in message, message
    assert json.dumps(hf) == before  # the dict is read, never changed


@pytest.mark.parametrize("value", [[], "llama", 3, None])
def test_config_that_is_not_an_object(value):
    with pytest.raises(PolarJaxError, match="config.json must be a JSON object"):
        config_from_hf(value)


def test_null_fields_take_their_defaults():
    """HF writes null for unset optional fields: they take the same defaults as absent ones."""
    nulls = dict(LLAMA, num_key_value_heads=None, head_dim=None, rms_norm_eps=None,
                 tie_word_embeddings=None, rope_parameters=None, hidden_act=None)
    absent = {k: v for k, v in nulls.items() if v is not None}
    config = config_from_hf(nulls)
    assert config == config_from_hf(absent)
    assert (config.num_kv_heads, config.head_dim, config.rms_norm_eps) == (4, 8, 1e-6)
    assert (config.rope.rope_type, config.rope.theta) == ("default", 10000.0)
    assert config.activation == "silu" and config.tie_word_embeddings is False


def test_parsed_fields_agree_with_transformers():
    """The configs transformers writes (v5 `rope_parameters`) and their v4 spelling
    (`rope_scaling` with `type`, top-level `rope_theta`) parse to what transformers reads."""
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng()
    kv = int(rng.choice([1, 2, 4]))
    hf_llama = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=kv, head_dim=24, max_position_embeddings=256,
        rope_parameters=dict(LLAMA3_ROPE, factor=float(rng.integers(2, 9))))
    hf_qwen = transformers.Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=int(rng.integers(8, 64)), max_window_layers=int(rng.integers(0, 5)))
    for hf in (hf_llama, hf_qwen):
        ours = config_from_hf(hf.to_dict())
        assert (ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim, ours.mlp_dim) == (
            hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
            getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            hf.intermediate_size)
        params = hf.rope_parameters
        assert (ours.rope.rope_type, ours.rope.theta) == (params["rope_type"], params["rope_theta"])
        legacy = hf.to_dict()
        scaling = dict(legacy.pop("rope_parameters"))
        legacy["rope_theta"] = scaling.pop("rope_theta")
        scaling["type"] = scaling.pop("rope_type")
        assert config_from_hf(dict(legacy, rope_scaling=scaling)) == ours
    assert config_from_hf(hf_llama.to_dict()).rope.factor == hf_llama.rope_parameters["factor"]
    windows = [hf_qwen.sliding_window if t == "sliding_attention" else None
               for t in hf_qwen.layer_types]
    assert list(config_from_hf(hf_qwen.to_dict()).sliding_windows) == windows


def test_cli_convert_refuses_a_bad_config_in_one_line(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(dict(OPT, num_hidden_layers=-2)))
    capsys.readouterr()
    assert main(["convert", str(src), str(dst)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out == ""
    assert err.splitlines() == [
        "polar-jax: error: config.json: 'num_hidden_layers' must be an integer in [1, 1024], got -2"]
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert json.loads((src / "config.json").read_text())["num_hidden_layers"] == -2
