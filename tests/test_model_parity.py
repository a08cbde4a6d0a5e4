"""Logit parity with Hugging Face `transformers` (PyTorch, float32) for every supported family.

Each variant is a small random model whose weights are drawn at a scale that makes logits
strongly input- and position-dependent; it is saved with `save_pretrained`, converted with
`convert_checkpoint`, and compared on a padded batch and on one 600+ token input.
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from convert import convert_checkpoint
from models.kv_cache import KVCache
from models.sharding import kv_cache_shardings, make_mesh
from polar_jax.errors import PolarJaxError
from polar_jax.loading import ModelDir, load_model

TOL = 1e-4  # max |ours - HF| relative to the largest HF logit

_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5)
_PHI3 = dict(vocab_size=512, hidden_size=80, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=2048, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
_GEMMA = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, head_dim=16, max_position_embeddings=2048, sliding_window=100)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=64)

VARIANTS = {
    "opt-pre-ln": ("OPTConfig", "OPTForCausalLM", dict(
        vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=1024, do_layer_norm_before=True, word_embed_proj_dim=64)),
    "opt-post-ln-projected": ("OPTConfig", "OPTForCausalLM", dict(
        vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=1024, do_layer_norm_before=False, word_embed_proj_dim=32)),
    "opt-gelu-untied": ("OPTConfig", "OPTForCausalLM", dict(
        vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=1024, activation_function="gelu", tie_word_embeddings=False)),
    "llama-2-mha": ("LlamaConfig", "LlamaForCausalLM", dict(
        _LLAMA, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-3.1-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(
        _LLAMA, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
        rope_parameters=dict(_LLAMA3_ROPE, factor=8.0))),
    "llama-3.2-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        _LLAMA, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters=dict(_LLAMA3_ROPE, factor=32.0))),
    "llama-linear-rope-biases": ("LlamaConfig", "LlamaForCausalLM", dict(
        _LLAMA, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "llama-dynamic-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        _LLAMA, num_key_value_heads=4, max_position_embeddings=256,
        rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        _LLAMA, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(
        _LLAMA, num_key_value_heads=2, sliding_window=100, tie_word_embeddings=False)),
    # The newer families at hidden sizes that are not powers of two.
    "qwen3-gqa-sliding": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        _LLAMA, hidden_size=80, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=100, max_window_layers=1,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "phi3-mha-sliding": ("Phi3Config", "Phi3ForCausalLM", dict(
        _PHI3, num_key_value_heads=4, sliding_window=100, tie_word_embeddings=True)),
    "phi3.5-longrope-gqa": ("Phi3Config", "Phi3ForCausalLM", dict(
        _PHI3, num_key_value_heads=2, original_max_position_embeddings=100,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                             short_factor=[1.0 + 0.1 * i for i in range(10)],
                             long_factor=[1.0 + 0.5 * i for i in range(10)]))),
    "gemma2-gqa": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        _GEMMA, num_key_value_heads=2, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0)),
    # Gemma 3's 5 : 1 pattern of local and global layers cut to 2 : 1 (the default pattern:
    # tests/test_config_validation.py).
    "gemma3-mha-untied": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _GEMMA, num_hidden_layers=3, num_key_value_heads=4, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                rope_theta=100000.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=1000.0)})),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights at a scale where every layer visibly shapes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                std = 1.0 if "embed" in name else 1.5 / p.shape[-1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            else:  # norm scales
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.2)


def random_hf_model(spec, directory):
    """A VARIANTS `spec` built with transformers, randomized, saved and converted (float32):
    (HF model, its directory, our config, our model)."""
    config_cls, model_cls, kwargs = spec
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    hf = getattr(transformers, model_cls)(config).eval()
    _randomize(hf, seed=int(np.random.default_rng().integers(2**31)))
    src, dst = directory / "hf", directory / "converted"
    hf.save_pretrained(src)
    convert_checkpoint(str(src), str(dst), dtype="float32")
    config, model = load_model(str(dst), dtype=jnp.float32)
    return hf, src, config, model


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """`variants(name)` -> (name, HF model, our model, HF directory), built once per module."""
    built = {}

    def get(name: str):
        if name not in built:
            hf, src, _, model = random_hf_model(VARIANTS[name], tmp_path_factory.mktemp(name))
            built[name] = name, hf, model, src
        return built[name]

    return get


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, variants):
    return variants(request.param)


def _compare(hf, model, tokens: np.ndarray, mask: np.ndarray, opt: bool) -> float:
    kwargs = {}
    if not opt:  # HF Llama does not derive positions from the mask; give the ones we use
        kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask), **kwargs).logits.numpy()
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert np.isfinite(ours[valid]).all()
    return float(np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max())


def test_padded_batch(variant):
    name, hf, model, _ = variant
    rng = np.random.default_rng()
    tokens = rng.integers(0, hf.config.vocab_size, size=(4, 48))
    mask = np.ones_like(tokens)
    mask[1, :17] = 0  # left padding
    mask[2, 30:] = 0  # right padding
    mask[3, :3] = 0
    assert _compare(hf, model, tokens, mask, name.startswith("opt")) < TOL


def test_long_input(variant):
    """600+ tokens: RoPE scaling, learned positions and the sliding window all matter here."""
    name, hf, model, _ = variant
    rng = np.random.default_rng()
    tokens = rng.integers(0, hf.config.vocab_size, size=(1, 640))
    mask = np.ones_like(tokens)
    assert _compare(hf, model, tokens, mask, name.startswith("opt")) < TOL


def test_logits_depend_on_input_and_position(variant):
    """Guards the parity tests against a degenerate model whose logits barely move."""
    _, hf, model, _ = variant
    rng = np.random.default_rng()
    mask = jnp.ones((1, 64), jnp.int32)
    a, b = (jnp.asarray(rng.integers(0, hf.config.vocab_size, size=(1, 64))) for _ in range(2))
    logits_a, logits_b = np.asarray(model(a, mask))[0], np.asarray(model(b, mask))[0]
    scale = np.abs(logits_a).max()
    assert np.abs(logits_a[-1] - logits_b[-1]).max() > 0.1 * scale
    # Shuffling the context before the last token: without position information the last
    # token's attention would be invariant to the order of its keys.
    shuffled = a.at[0, :-1].set(a[0, :-1][rng.permutation(63)])
    logits_s = np.asarray(model(shuffled, mask))[0]
    assert np.abs(logits_a[-1] - logits_s[-1]).max() > 0.01 * scale


def test_legacy_rope_scaling_spelling(variant, tmp_path):
    """transformers v4 wrote `rope_scaling` and a top-level `rope_theta`: same model."""
    name, hf, model, src = variant
    config = json.loads((src / "config.json").read_text())
    params = config.pop("rope_parameters", None)
    if not params or params.get("rope_type", "default") == "default":
        pytest.skip(f"{name} has no rope scaling")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps(config))
    shutil.copyfile(src / "model.safetensors", legacy / "model.safetensors")  # a link out of
    # the directory would be refused: files of a checkpoint must lie inside it
    _, legacy_model = load_model(str(legacy), dtype=jnp.float32)
    tokens = jnp.asarray(np.random.default_rng().integers(0, 512, size=(1, 300)))
    mask = jnp.ones_like(tokens)
    np.testing.assert_array_equal(np.asarray(model(tokens, mask)), np.asarray(legacy_model(tokens, mask)))


MESHES = {"tp2": (2, 1), "tp4": (4, 1), "dp2xtp2": (2, 2)}  # name: (tp, dp)
# Which axis of each parameter (by name) splits over `model`; the rest, and learned positions,
# replicated.
EXPECTED_SPLIT = {"w_qkv": (1,), "b_qkv": (0,), "w_o": (0,), "w_in": (0,), "b_in": (0,),
                  "w_gate_up": (0,), "b_gate_up": (0,), "w_out": (0,), "embedding": (0,)}


# Every variant at tp 2. At tp 4 and dp 2 x tp 2 (the same rules at other splits): an OPT and
# a Llama-family GQA variant, the MHA variant whose 4 KV groups split one per device at tp 4,
# and the refusal of tp 4 for 2 KV groups.
SHARDED_CASES = ([(name, "tp2") for name in sorted(VARIANTS)]
                 + [("opt-post-ln-projected", "tp4"), ("opt-post-ln-projected", "dp2xtp2"),
                    ("llama-2-mha", "tp4"), ("llama-3.1-gqa", "tp4"),
                    ("llama-3.1-gqa", "dp2xtp2")])


@pytest.mark.parametrize("name, mesh_name", SHARDED_CASES,
                         ids=[f"{name}-{mesh}" for name, mesh in SHARDED_CASES])
def test_sharded_model_equals_one_device(variants, name, mesh_name):
    """Loaded straight into the shards of a tensor- (and data-) parallel mesh: every parameter
    placed by the sharding rules, leaf by leaf, and the logits of a padded batch those of one
    device (float32, within 1e-5 of the largest logit). A split that does not divide the KV
    groups is refused in one line."""
    name, hf, model, src = variants(name)
    tp, dp = MESHES[mesh_name]
    mesh = make_mesh(tp, dp)
    model_dir = ModelDir.open(src.parent / "converted")
    config = model_dir.config
    if config.num_kv_heads % tp:
        with pytest.raises(PolarJaxError) as err:
            model_dir.load(jnp.float32, mesh)
        message = str(err.value)
        assert f"--tp {tp} must divide the model's {config.num_kv_heads} KV groups" in message
        assert "\n" not in message
        return
    sharded = model_dir.load(jnp.float32, mesh)
    state = nnx.to_pure_dict(nnx.state(sharded))
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = [getattr(k, "key", k) for k in path]
        split = EXPECTED_SPLIT.get(keys[-1], ())
        if keys[0] == "pos_embed" or (keys[-1] == "embedding" and config.vocab_size % tp):
            split = ()
        spec = P(*("model" if axis in split else None for axis in range(leaf.ndim)))
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (keys, spec)
        # No device holds more than its shard: the pieces on the devices add up to the array.
        pieces = sum(int(np.prod(shard.data.shape)) for shard in leaf.addressable_shards)
        assert pieces == leaf.size * (mesh.size // (tp if split else 1)), keys
    cache = kv_cache_shardings(KVCache.abstract(config, 4, 16, jnp.float32), mesh)
    for sharding in jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, NamedSharding)):
        assert sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model", None, None)), 4)
    rng = np.random.default_rng()
    tokens = jnp.asarray(rng.integers(0, hf.config.vocab_size, size=(4, 40)))
    mask = np.ones(tokens.shape, np.int32)
    mask[1, :9], mask[2, 30:] = 0, 0
    one = np.asarray(model(tokens, jnp.asarray(mask)))
    many = np.asarray(jax.jit(lambda m, t, k: m(t, k))(sharded, tokens, jnp.asarray(mask)))
    valid = mask.astype(bool)
    scale = np.abs(one[valid]).max()
    assert np.abs(many - one)[valid].max() <= 1e-5 * scale
