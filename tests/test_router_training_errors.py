"""Damaged routers directories, batch sizes beyond the calibration, and bad or diverging
router training: each refused in one line naming the problem, with nothing destroyed.

The routers directory is written once by the real pipeline on a tiny random OPT (hidden 32,
2 layers); training errors run `routers.train.train` on fresh synthetic `Collected` data.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli
from polar_jax.errors import PolarJaxError
from polar_jax.loading import load_model
from polar_jax.sparsity import SparsityPlan
from routers.collect import Collected
from routers.model import METADATA_FILE, load_routers
from routers.pipeline import train_routers
from routers.train import (
    MLP_NEG_WEIGHT_OFFSET,
    TrainSettings,
    _Trainer,
    mlp_positive_rate,
    train,
    uniform_groups,
)

transformers = pytest.importorskip("transformers")

DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo" / "tiny-opt"  # its tokenizer
N = 64  # the tiny model's MLP neurons


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, config, routers dir): a random HF OPT with the demo tokenizer, and routers
    trained on it by `train_routers` (one epoch on random token ids)."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "opt"
    hf = transformers.OPTConfig(vocab_size=4096, hidden_size=32, ffn_dim=N, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128,
                                word_embed_proj_dim=32, pad_token_id=0, bos_token_id=0,
                                eos_token_id=0)
    transformers.OPTForCausalLM(hf).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(DEMO_MODEL / name, model_dir / name)
    config, model = load_model(str(model_dir))
    ids = np.random.default_rng().integers(0, 4096, 400).astype(np.int32)
    settings = TrainSettings(epochs=1, batch_size=16, mlp_rank=8)
    train_routers(model, config, ids, root / "routers", settings, seq_len=32)
    return model_dir, config, root / "routers"


def _damaged(tiny, tmp_path: Path, edit) -> Path:
    """A copy of the routers directory whose routers.json is `edit(metadata)` (or, if `edit`
    returns text, that text)."""
    routers = tmp_path / "routers"
    shutil.copytree(tiny[2], routers)
    metadata = json.loads((routers / METADATA_FILE).read_text())
    edited = edit(metadata)
    text = edited if isinstance(edited, str) else json.dumps(metadata if edited is None else edited)
    (routers / METADATA_FILE).write_text(text)
    return routers


def _set(path, value):
    """An edit setting metadata[path[0]][path[1]]... to `value` (deleting it if `value` is
    `...`)."""
    def edit(metadata):
        *parents, last = path
        for key in parents:
            metadata = metadata[key]
        if value is ...:
            del metadata[last]
        else:
            metadata[last] = value
    return edit


# (edit, what the one-line message must contain)
DAMAGE = {
    "negative k": (_set(("mlp_topk", "1", 0), -3), "'mlp_topk'['1'][0] must be an integer in [1, 64], got -3"),
    "k beyond N": (_set(("mlp_topk", "16", 1), N + 1), "'mlp_topk'['16'][1] must be an integer in [1, 64]"),
    "fractional k": (_set(("mlp_topk", "4", 0), 12.5), "'mlp_topk'['4'][0] must be an integer"),
    "k a string": (_set(("mlp_topk", "4", 0), "12"), "'mlp_topk'['4'][0] must be an integer"),
    "table too short": (_set(("mlp_topk", "2"), [8]), "'mlp_topk'['2'] must be a list of 2 items"),
    "table row not a list": (_set(("mlp_topk", "2"), 8), "'mlp_topk'['2'] must be a list"),
    "non-integer batch size": (_set(("mlp_topk", "4x"), [8, 8]), "batch size '4x'"),
    "zero batch size": (_set(("mlp_topk", "0"), [8, 8]), "batch size '0'"),
    "padded batch size": (_set(("mlp_topk", "08"), [8, 8]), "batch size '08'"),
    "table a list": (_set(("mlp_topk",), [[8, 8]]), "'mlp_topk' must be a JSON object"),
    "empty table": (_set(("mlp_topk",), {}), "'mlp_topk' must be null or map at least one"),
    "no table key": (_set(("mlp_topk",), ...), "has no 'mlp_topk'"),
    "negative rank": (_set(("mlp_rank",), -8), "'mlp_rank' must be an integer >= 1, got -8"),
    "rank a string": (_set(("mlp_rank",), "8"), "'mlp_rank' must be an integer"),
    "no rank": (_set(("mlp_rank",), ...), "has no 'mlp_rank'"),
    "smaller rank than the params": (_set(("mlp_rank",), 4), "do not match the shapes"),
    "larger rank than the params": (_set(("mlp_rank",), 16), "'mlp_down' is stored as (2, 32, 8) but expected (2, 32, 16)"),
    "attn_topk zero": (_set(("attn_topk",), 0), "'attn_topk' must be a finite number in (0, 1]"),
    "attn_topk a string": (_set(("attn_topk",), "half"), "'attn_topk' must be a finite number"),
    "probe window zero": (_set(("attn_probe",), 0), "'attn_probe' must be an integer >= 1, got 0"),
    "probe without its params": (_set(("attn_probe",), 8), "do not match the shapes"),
    "model a string": (_set(("model",), "opt"), "'model' must be a JSON object"),
    "negative layer count": (_set(("model", "num_layers"), -2), "'model'['num_layers'] must be an integer >= 1"),
    "other model": (_set(("model", "num_kv_heads"), 2), "belong to another model"),
    "no model": (_set(("model",), ...), "has no 'model'"),
    "other format": (_set(("format",), 7), "routers format 7"),
    "not an object": (lambda m: "[1, 2]", "must be a JSON object"),
    "cut short": (lambda m: json.dumps(m)[:40], "not readable JSON"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_metadata_is_refused_in_one_line(tiny, tmp_path, case):
    edit, needle = DAMAGE[case]
    routers = _damaged(tiny, tmp_path, edit)
    before = {p: p.read_bytes() for p in routers.rglob("*") if p.is_file()}
    with pytest.raises(PolarJaxError) as info:
        load_routers(routers, tiny[1])
    message = str(info.value)
    assert "\n" not in message and needle in message, message
    assert str(routers) in message  # names the directory or its routers.json
    assert {p: p.read_bytes() for p in routers.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("damage, needle", [
    (lambda params: shutil.rmtree(params), "params is missing"),
    (lambda params: (params / "_METADATA").unlink(), "cannot read the arrays in"),
])
def test_damaged_params_are_refused_in_one_line(tiny, tmp_path, damage, needle):
    routers = _damaged(tiny, tmp_path, lambda metadata: None)
    damage(routers / "params")
    with pytest.raises(PolarJaxError) as info:
        load_routers(routers, tiny[1])
    assert "\n" not in str(info.value) and needle in str(info.value) and str(routers) in str(info.value)


def test_undamaged_routers_load(tiny):
    model_dir, config, routers_dir = tiny
    routers, metadata = load_routers(routers_dir, config)
    assert sorted(int(b) for b in metadata["mlp_topk"]) == [2**i for i in range(10)]
    u = jnp.asarray(np.random.default_rng().normal(size=(2, 5, 32)), jnp.float32)
    assert routers.mlp_scores(u).shape == (2, 5, N) and routers.mlp_down.shape == (2, 32, 8)


def _cli(capsys, argv) -> tuple[int, str]:
    """(exit code, stderr), checking that stderr holds one error line and no traceback."""
    rc, _, err = run_cli(capsys, argv)
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    return rc, err


def test_cli_generate_with_damaged_routers(tiny, tmp_path, capsys):
    routers = _damaged(tiny, tmp_path, _set(("mlp_topk", "1", 1), 0))
    rc, err = _cli(capsys, ["generate", "--model", tiny[0], "--routers", routers,
                            "--prompt", "the", "--max-new-tokens", "2"])
    assert rc == 2
    assert err.strip() == (f"polar-jax: error: {routers / METADATA_FILE}: 'mlp_topk'['1'][1] "
                           f"must be an integer in [1, {N}], got 0")


def _random_table(sizes, num_layers=2) -> dict:
    rng = np.random.default_rng()
    return {str(b): rng.integers(1, int(0.8 * N), num_layers).tolist() for b in sizes}


def test_plan_rounds_up_within_calibration_and_refuses_beyond(tiny, tmp_path):
    """Batch sizes between calibrated ones take the next calibrated size's k; beyond the
    largest, the plan is refused."""
    table = _random_table((1, 4, 16))
    routers = _damaged(tiny, tmp_path, _set(("mlp_topk",), table))
    _, metadata = load_routers(routers, tiny[1])
    for batch in range(1, 17):
        expected = table[str(next(b for b in (1, 4, 16) if b >= batch))]
        plan = SparsityPlan.build(tiny[1], metadata, 0.5, (0,), batch)
        assert list(plan.mlp_neurons) == expected
    for batch in (17, 1024):
        with pytest.raises(PolarJaxError) as info:
            SparsityPlan.build(tiny[1], metadata, 0.5, (0,), batch)
        assert str(info.value) == f"the routers' MLP k is calibrated for batch sizes up to 16; got {batch}"
    with pytest.raises(PolarJaxError, match="MLP batch size must be an integer >= 1, got 0"):
        SparsityPlan.build(tiny[1], metadata, 0.5, (0,), 0)


def test_cli_generate_refuses_a_batch_beyond_calibration(tiny, tmp_path, capsys):
    """Three prompts decode in a batch bucket of 4; routers calibrated up to 2 refuse it."""
    routers = _damaged(tiny, tmp_path, _set(("mlp_topk",), _random_table((1, 2))))
    rc, err = _cli(capsys, ["generate", "--model", tiny[0], "--routers", routers,
                            "--prompt", "the", "--prompt", "a", "--prompt", "of",
                            "--max-new-tokens", "2"])
    assert rc == 2
    assert err.strip() == ("polar-jax: error: the routers' MLP k is calibrated for batch sizes "
                           "up to 2; got 4")


# ---------------------------------------------------------------------------------------------
# Training settings and numerics.


@pytest.mark.parametrize("field, value, allowed", [
    ("learning_rate", math.nan, "finite number > 0"),
    ("learning_rate", math.inf, "finite number > 0"),
    ("learning_rate", 0.0, "finite number > 0"),
    ("learning_rate", -1e-3, "finite number > 0"),
    ("learning_rate", "1e-3", "finite number > 0"),
    ("weight_decay", -0.01, "finite number >= 0"),
    ("weight_decay", math.nan, "finite number >= 0"),
    ("epochs", 0, "integer >= 1"),
    ("epochs", 2.5, "integer >= 1"),
    ("batch_size", -64, "integer >= 1"),
    ("patience", True, "integer >= 1"),
    ("mlp_rank", 0, "integer >= 1"),
    ("attn_topk", 0.0, "in (0, 1]"),
    ("attn_topk", 1.5, "in (0, 1]"),
    ("seed", -1, "integer >= 0"),
])
def test_bad_train_settings(field, value, allowed):
    with pytest.raises(PolarJaxError) as info:
        TrainSettings(**{field: value})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{field} must be") and allowed in message


@pytest.mark.parametrize("lr", ["nan", "0", "-1e-3"])
def test_cli_train_routers_refuses_bad_learning_rate(tiny, tmp_path, capsys, lr):
    text = tmp_path / "text.txt"
    text.write_text("the a of and to in is it that was " * 40)
    out = tmp_path / "routers"
    rc, err = _cli(capsys, ["train-routers", "--model", tiny[0], "--text", text, "--out", out,
                            f"--lr={lr}"])
    assert rc == 2 and ("lr" in err or "learning_rate" in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


@pytest.mark.parametrize("seq_len", [129, 5000])
def test_train_routers_refuses_windows_beyond_the_positions(tiny, tmp_path, capsys, monkeypatch,
                                                            seq_len):
    """Past the model's 128 positions the windows read nothing (NaN losses) and grow memory:
    refused before the model loads (CLI) or anything is collected (API)."""
    import polar_jax.loading as loading
    import routers.pipeline as pipeline

    text = tmp_path / "text.txt"
    text.write_text("the a of and to in is it that was " * 40)
    out = tmp_path / "routers"
    monkeypatch.setattr(loading.ModelDir, "load", lambda *a, **k: pytest.fail("the model loaded"))
    rc, err = _cli(capsys, ["train-routers", "--model", tiny[0], "--text", text, "--out", out,
                            "--seq-len", seq_len])
    needle = (f"--seq-len {seq_len} exceeds the model's 128 positions (max_position_embeddings)"
              "; lower --seq-len")
    assert rc == 2 and err == f"polar-jax: error: {needle}\n"
    monkeypatch.setattr(pipeline, "collect", lambda *a, **k: pytest.fail("collected"))
    ids = np.random.default_rng().integers(0, 4096, 4 * seq_len).astype(np.int32)
    with pytest.raises(PolarJaxError) as info:
        train_routers(None, tiny[1], ids, out, TrainSettings(batch_size=16), seq_len=seq_len)
    assert str(info.value) == needle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


def _synthetic(directory: Path, tokens: int, d: int = 32, hkv: int = 4) -> Collected:
    """Random router data for the tiny model: u `[2, T, d]`, group norms, active neurons."""
    directory.mkdir()
    rng = np.random.default_rng()
    u = jnp.asarray(rng.normal(size=(2, tokens, d)), jnp.bfloat16)
    np.save(directory / "u.npy", np.asarray(jax.lax.bitcast_convert_type(u, jnp.uint16)))
    np.save(directory / "group_norm.npy", rng.random((2, tokens, hkv)).astype(np.float32))
    np.save(directory / "active.npy", np.packbits(rng.random((2, tokens, N)) < 0.15, axis=-1))
    return Collected.open(directory)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("collected")
    return _synthetic(root / "train", 256), _synthetic(root / "calib", 64)


@pytest.mark.parametrize("lr, needle", [
    (1e30, "router training diverged at epoch 1 (training loss nan"),
    (10.0, "no epoch improved the held-out loss of the untrained routers"),
])
def test_training_that_fails_is_refused(tiny, synthetic, lr, needle):
    settings = TrainSettings(learning_rate=lr, epochs=2, batch_size=16, mlp_rank=8)
    with pytest.raises(PolarJaxError) as info:
        train(tiny[1], *synthetic, settings)
    message = str(info.value)
    assert "\n" not in message and needle in message and f"now {lr:g}" in message, message


def test_training_returns_the_best_epoch(tiny, synthetic):
    """The routers returned are the epoch with the lowest held-out loss, readable after later
    epochs donated the buffers they were trained in."""
    config, (train_data, calib_data) = tiny[1], synthetic
    settings = TrainSettings(learning_rate=3e-2, epochs=4, patience=4, batch_size=16, mlp_rank=8)
    routers, history = train(config, train_data, calib_data, settings)
    assert len(history) == 4 and all(math.isfinite(h["train_loss"]) for h in history)
    neg = mlp_positive_rate(train_data, N) + MLP_NEG_WEIGHT_OFFSET
    measured = _Trainer(routers, config, settings, uniform_groups(config, settings.attn_topk),
                        neg).heldout_loss(calib_data)
    assert measured == pytest.approx(min(h["heldout_loss"] for h in history), rel=1e-6)


def test_training_needs_a_batch_of_tokens(tiny, synthetic, tmp_path):
    few = _synthetic(tmp_path / "few", 8)
    with pytest.raises(PolarJaxError, match=r"at least batch_size \(16\) training tokens .* got 8"):
        train(tiny[1], few, synthetic[1], TrainSettings(batch_size=16, mlp_rank=8))
