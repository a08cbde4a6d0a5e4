"""Data-parallel router data collection and training: the data collected over dp 2 (and dp 2 x
tp 2) and the routers trained over dp 2 equal one device's; `train-routers --dp` end to end."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from conftest import fixture_path, run_cli
from models import config_from_hf
from models.registry import param_specs
from models.sharding import make_mesh, param_shardings
from polar_jax.bench.decode import random_state
from polar_jax.errors import PolarJaxError
from routers.collect import Collected, collect
from routers.train import TrainSettings, train

CONFIG = config_from_hf(dict(
    model_type="opt", vocab_size=128, hidden_size=64, ffn_dim=256, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=64, activation_function="relu",
    do_layer_norm_before=True))
MESHES = {"dp1": None, "dp2": (1, 2), "dp2xtp2": (2, 2)}  # (tp, dp)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """{mesh name: Collected} of one random model (weights 5x the bench's scale, so every layer
    moves the residual stream) over 1,500 random tokens in windows of 32, 3 windows a batch."""
    rng = np.random.default_rng()
    graphdef, state = random_state(CONFIG, jnp.float32, int(rng.integers(1 << 30)))
    state = jax.tree.map(lambda a: a * 5, state)
    ids = rng.integers(0, CONFIG.vocab_size, 1500).astype(np.int32)
    out = {}
    for name, shape in MESHES.items():
        mesh = None if shape is None else make_mesh(*shape)
        placed = state if mesh is None else jax.device_put(state, param_shardings(state, mesh))
        out[name] = collect(nnx.merge(graphdef, placed), CONFIG, ids,
                            tmp_path_factory.mktemp(name), seq_len=32, batch_size=3, mesh=mesh)
    return out


@pytest.mark.parametrize("name", ["dp2", "dp2xtp2"])
def test_collected_over_a_mesh_equals_one_device(collected, name):
    """u within one bfloat16 rounding (its stored precision: tp's all-reduces change the
    float32 sums that are rounded) and 1e-6 of its largest magnitude (near-zero values of the
    norm, where float32 cancellation dominates); group norms within 1e-5 relative; active
    neurons equal but for at most 1 in 100,000 labels (a pre-activation within float32
    rounding of zero may change sign with the all-reduce's order: 1 of 768,000 seen)."""
    one, many = collected["dp1"], collected[name]
    assert many.num_tokens == one.num_tokens == 1500
    u_one, u_many = (np.asarray(data.u).view(jnp.bfloat16).astype(np.float32) for data in (one, many))
    np.testing.assert_allclose(u_many, u_one, rtol=2**-7, atol=1e-6 * np.abs(u_one).max())
    np.testing.assert_allclose(many.group_norm, one.group_norm, rtol=1e-5,
                               atol=1e-5 * np.abs(one.group_norm).max())
    flipped = np.unpackbits(np.asarray(many.active) ^ np.asarray(one.active))
    assert flipped.mean() <= 1e-5, flipped.sum()
    assert 0.1 < np.unpackbits(one.active).mean() < 0.9  # the labels are not trivial


def test_routers_trained_over_dp2_equal_one_device(collected):
    """Two epochs of 75 steps on the first 1,200 tokens, held out the last 300. Data
    parallelism only changes the order of the gradient's sum over a step's tokens (each device
    sums its half, then the halves are added): a float32 rounding of ~1e-7 relative per step,
    which Adam's normalised updates carry through 150 steps, so the routers agree to 1e-5 of
    each parameter's largest magnitude and the losses to 1e-5 relative."""
    data = collected["dp1"]
    split = lambda part: Collected(data.directory, data.u[:, part], data.group_norm[:, part],
                                   data.active[:, part])
    settings = TrainSettings(mlp_rank=16, epochs=2, batch_size=16, learning_rate=1e-3,
                             patience=2, seed=int(np.random.default_rng().integers(1 << 30)))
    (one, history_one), (many, history_many) = (
        train(CONFIG, split(slice(1200)), split(slice(1200, None)), settings, mesh=mesh)
        for mesh in (None, make_mesh(1, 2)))
    for ref, got in zip(jax.tree.leaves(nnx.state(one)), jax.tree.leaves(nnx.state(many))):
        ref, got = np.asarray(ref), np.asarray(got)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert len(history_many) == len(history_one) == 2
    for ref, got in zip(history_one, history_many):
        assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert got["heldout_loss"] == pytest.approx(ref["heldout_loss"], rel=1e-5)
    with pytest.raises(PolarJaxError, match=r"--batch-size 16 must be a multiple of --dp 3 \("):
        train(CONFIG, data, data, settings, mesh=make_mesh(1, 3))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random Hugging Face Llama checkpoint (2 layers, hidden 32, 2 KV groups) with the
    tiny-opt tokenizer; its gated MLP has no router, so nothing is calibrated."""
    hf_config = dict(model_type="llama", vocab_size=4096, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=128, hidden_act="silu", rms_norm_eps=1e-5,
                     tie_word_embeddings=False, torch_dtype="float32")
    out = tmp_path_factory.mktemp("hf") / "tiny-llama"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf_config))
    rng = np.random.default_rng()
    save_file({name: rng.normal(0, 0.3, spec.hf_shape).astype(np.float32)
               for name, spec in param_specs(config_from_hf(hf_config)).items()},
              out / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture_path("fixtures", "tiny-opt") / name, out / name)
    return out


def test_train_routers_cli_over_dp2(tiny_llama, tmp_path, capsys):
    text = fixture_path("data", "wikitext2_valid.txt")
    args = ["train-routers", "--model", tiny_llama, "--text", text, "--max-tokens", 2000,
            "--seq-len", 64, "--epochs", 2, "--batch-size", 16, "--lr", 1e-3,
            "--quiet", "--json"]
    rc, out, err = run_cli(capsys, args + ["--out", tmp_path / "routers", "--dp", 2])
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["tokens_train"] == 1600 and 0 <= summary["attn_recall_mean"] <= 1
    assert summary["mlp_topk"] is None
    assert (tmp_path / "routers" / "routers.json").is_file()
    rc, out, err = run_cli(capsys, args + ["--out", tmp_path / "more", "--dp", 16])
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "needs 16 devices; 8 are visible" in err
