"""Bad input to the converter and the CLI: every error names the problem, leaves nothing at
DST, and the CLI turns it into `polar-jax: error: ...` with a non-zero exit (no traceback).

Also the good paths the error handling guards: pickled and sharded checkpoints, --force, and
`polar-jax convert` + `polar-jax eval perplexity` against an independent HF computation.

Every checkpoint is a tiny randomly initialised Hugging Face model built once per module.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from conftest import fixture_path, run_cli  # noqa: E402
from convert import convert_checkpoint  # noqa: E402
from polar_jax.cli import main  # noqa: E402
from polar_jax.errors import PolarJaxError  # noqa: E402
from polar_jax.loading import load_model  # noqa: E402

SUPPORTED = ("llama", "mistral", "opt", "qwen2")

# A word-level tokenizer the tiny models' 128-token vocabularies can hold, so the eval error
# paths run without the shared fixtures.
WORDS = ("the a of and to in is it that was he she they we on at by for with as this from "
         "or be are were not but all his her one had said there when what who will more no "
         "if out so up into time only new some could than them these two may first then do "
         "any like my now over such our man me even most made after also did many before").split()
TEXT = (
    "The tiny model was made for a test, and it is not trained at all. It said that there "
    "was one man on the first day, and then two more after some time. When they had done "
    "what they could, she made a new plan: all of them will do more than before, or no one "
    "will. If he is out, we are in; if we are out, they are up. This is the end of the text, "
    "but there may be more: the man, the time, the day and the plan were all made by us.\n"
    "Numbers like 3.14159 and 2718 are here too, with odd punctuation (!?) and UPPER case.\n"
)


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny HF checkpoints, built once.


def _word_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)


def _opt_config(vocab_size: int, init_std: float = 0.1):
    return transformers.OPTConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, init_std=init_std,
        dropout=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def opt_hf(tmp_path_factory):
    """(source dir, HF model): tiny OPT in one model.safetensors, with a word tokenizer."""
    src = tmp_path_factory.mktemp("hf") / "opt"
    model = transformers.OPTForCausalLM(_opt_config(vocab_size=128)).eval()
    model.save_pretrained(src)
    _word_tokenizer(src)
    assert (src / "model.safetensors").exists()
    return src, model


@pytest.fixture(scope="module")
def opt_src(opt_hf):
    return opt_hf[0]


@pytest.fixture(scope="module")
def llama_sharded(tmp_path_factory):
    """(source dir, HF model): tiny GQA Llama, untied head, sharded safetensors with an index."""
    src = tmp_path_factory.mktemp("hf") / "llama-sharded"
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, initializer_range=0.1)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists()
    assert not (src / "model.safetensors").exists()
    assert len(list(src.glob("model-*-of-*.safetensors"))) > 1
    return src, model


@pytest.fixture(scope="module")
def opt_pickle(tmp_path_factory, opt_hf):
    """A copy of the tiny OPT with only pytorch_model.bin (torch.save of the state dict)."""
    src, model = opt_hf
    dst = tmp_path_factory.mktemp("hf") / "opt-pickle"
    dst.mkdir()
    shutil.copyfile(src / "config.json", dst / "config.json")
    torch.save(model.state_dict(), dst / "pytorch_model.bin")
    return dst


# ---------------------------------------------------------------------------------------------
# Helpers.


def _copy_source(src: Path, tmp_path: Path, name: str = "src") -> Path:
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def _edit_tensors(path: Path, edit) -> None:
    """Rewrites the safetensors file at `path` with `edit(dict of numpy arrays)` applied."""
    tensors = dict(safetensors_numpy.load_file(str(path)))
    edit(tensors)
    safetensors_numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def _assert_nothing_at(dst: Path) -> None:
    """No DST, and no temporary or backup sibling from an interrupted conversion."""
    assert not os.path.lexists(dst), f"{dst} was created by a failed conversion"
    if dst.parent.exists():
        leftovers = [p.name for p in dst.parent.iterdir()
                     if p.name.startswith((f".{dst.name}.tmp-", f".{dst.name}.old-"))]
        assert not leftovers, f"temporary directories left beside {dst}: {leftovers}"


def _convert_error(src, dst: Path, **kwargs) -> str:
    """The message of the PolarJaxError that converting `src` to `dst` raises."""
    with pytest.raises(PolarJaxError) as info:
        convert_checkpoint(str(src), str(dst), **kwargs)
    _assert_nothing_at(dst)
    return str(info.value)


def _assert_cli_error(capsys, argv, *needles: str) -> str:
    rc, out, err = run_cli(capsys, argv)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("polar-jax: error: ")]
    assert len(error_lines) == 1, err
    for needle in needles:
        assert needle in error_lines[0], (needle, error_lines[0])
    return error_lines[0]


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        ids = torch.from_numpy(tokens.astype(np.int64))
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()


def _assert_logits_match(dst: Path, hf_model) -> None:
    config, model = load_model(str(dst), dtype=jnp.float32)
    rng = np.random.default_rng()
    tokens = rng.integers(0, config.vocab_size, size=(2, 12), dtype=np.int32)
    mask = np.ones_like(tokens)
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    theirs = _hf_logits(hf_model, tokens)
    assert ours.shape == theirs.shape == (2, 12, config.vocab_size)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


# ---------------------------------------------------------------------------------------------
# 1. Unsupported model_type.


def _set_model_type(src: Path, model_type: str) -> None:
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = model_type
    (src / "config.json").write_text(json.dumps(config))


def test_unsupported_model_type_lists_supported_types(opt_src, tmp_path):
    src = _copy_source(opt_src, tmp_path)
    _set_model_type(src, "gpt2")
    message = _convert_error(src, tmp_path / "out")
    assert "'gpt2'" in message
    for model_type in SUPPORTED:
        assert model_type in message


def test_unsupported_model_type_cli(opt_src, tmp_path, capsys):
    src = _copy_source(opt_src, tmp_path)
    _set_model_type(src, "gpt2")
    dst = tmp_path / "out"
    line = _assert_cli_error(capsys, ["convert", src, dst], "gpt2", *SUPPORTED)
    assert "model_type" in line
    _assert_nothing_at(dst)


def test_config_without_model_type(opt_src, tmp_path):
    src = _copy_source(opt_src, tmp_path)
    config = json.loads((src / "config.json").read_text())
    del config["model_type"]
    (src / "config.json").write_text(json.dumps(config))
    message = _convert_error(src, tmp_path / "out")
    assert "model_type" in message and all(t in message for t in SUPPORTED)


def test_config_missing_required_field(opt_src, tmp_path):
    src = _copy_source(opt_src, tmp_path)
    config = json.loads((src / "config.json").read_text())
    del config["ffn_dim"]
    (src / "config.json").write_text(json.dumps(config))
    assert "'ffn_dim'" in _convert_error(src, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# 2-4. Missing, unexpected, duplicated, misshapen and non-float tensors.


def test_missing_tensor_is_named(opt_src, tmp_path, capsys):
    src = _copy_source(opt_src, tmp_path)
    name = "model.decoder.layers.1.fc2.bias"
    _edit_tensors(src / "model.safetensors", lambda t: t.pop(name))
    dst = tmp_path / "out"
    message = _convert_error(src, dst)
    assert "missing" in message and repr(name) in message
    _assert_cli_error(capsys, ["convert", src, dst], "missing", name)
    _assert_nothing_at(dst)


def test_many_missing_tensors_are_summarised(opt_src, tmp_path):
    src = _copy_source(opt_src, tmp_path)

    def drop_layer_1(tensors):
        for name in [n for n in tensors if n.startswith("model.decoder.layers.1.")]:
            del tensors[name]

    _edit_tensors(src / "model.safetensors", drop_layer_1)
    message = _convert_error(src, tmp_path / "out")
    # 16 tensors per OPT layer: five are named, the rest counted.
    assert "missing" in message and "model.decoder.layers.1." in message
    assert "and 11 more" in message


@pytest.mark.parametrize("name, shape", [
    ("model.decoder.layers.0.fc3.weight", (64, 32)),       # no such module
    ("model.decoder.layers.2.fc1.weight", (64, 32)),       # a layer beyond num_hidden_layers
    ("lm_head.bias", (128,)),                             # not part of an OPT
])
def test_unexpected_tensor_is_named(opt_src, tmp_path, name, shape):
    src = _copy_source(opt_src, tmp_path)
    _edit_tensors(src / "model.safetensors",
                  lambda t: t.__setitem__(name, np.zeros(shape, np.float32)))
    message = _convert_error(src, tmp_path / "out")
    assert "unexpected" in message and repr(name) in message
    assert str(shape) in message


def test_duplicate_tensor_is_named(opt_src, tmp_path):
    """`decoder.…` (base-model save) and `model.decoder.…` name the same weight."""
    src = _copy_source(opt_src, tmp_path)
    name = "model.decoder.layers.0.fc1.weight"
    _edit_tensors(src / "model.safetensors",
                  lambda t: t.__setitem__(name.removeprefix("model."), t[name].copy()))
    message = _convert_error(src, tmp_path / "out")
    assert "twice" in message and "layers.0.fc1.weight" in message


def test_misshapen_tensor_names_both_shapes(opt_src, tmp_path, capsys):
    src = _copy_source(opt_src, tmp_path)
    name = "model.decoder.layers.0.fc1.weight"  # [ffn_dim, hidden] = (64, 32)
    _edit_tensors(src / "model.safetensors",
                  lambda t: t.__setitem__(name, np.zeros((63, 32), np.float32)))
    dst = tmp_path / "out"
    message = _convert_error(src, dst)
    assert repr(name) in message
    assert "(63, 32)" in message and "(64, 32)" in message
    _assert_cli_error(capsys, ["convert", src, dst], name, "(63, 32)", "(64, 32)")
    _assert_nothing_at(dst)


def test_transposed_tensor_is_misshapen(opt_src, tmp_path):
    src = _copy_source(opt_src, tmp_path)
    name = "model.decoder.layers.1.fc2.weight"  # [hidden, ffn_dim] = (32, 64)
    _edit_tensors(src / "model.safetensors", lambda t: t.__setitem__(name, t[name].T.copy()))
    message = _convert_error(src, tmp_path / "out")
    assert repr(name) in message and "(64, 32)" in message and "(32, 64)" in message


def test_non_float_tensor_is_named(opt_src, tmp_path):
    src = _copy_source(opt_src, tmp_path)
    name = "model.decoder.layers.0.fc1.bias"
    _edit_tensors(src / "model.safetensors",
                  lambda t: t.__setitem__(name, np.zeros(t[name].shape, np.int32)))
    message = _convert_error(src, tmp_path / "out")
    assert repr(name) in message and "int32" in message


# ---------------------------------------------------------------------------------------------
# 5. Truncated and unreadable weight files.


@pytest.mark.parametrize("keep", [0.5, 0.9, 100, 4])
def test_truncated_safetensors(opt_src, tmp_path, capsys, keep):
    """Cut in the data (0.5, 0.9 of the file), in the JSON header (100 bytes) or in its
    8-byte length prefix (4 bytes)."""
    src = _copy_source(opt_src, tmp_path)
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    dst = tmp_path / "out"
    message = _convert_error(src, dst)
    assert str(path) in message and "not a readable safetensors file" in message
    _assert_cli_error(capsys, ["convert", src, dst], "model.safetensors", "truncated")
    _assert_nothing_at(dst)


def test_truncated_shard(llama_sharded, tmp_path):
    src = _copy_source(llama_sharded[0], tmp_path)
    shard = sorted(src.glob("model-*-of-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    message = _convert_error(src, tmp_path / "out")
    assert shard.name in message and "not a readable safetensors file" in message


def test_missing_shard(llama_sharded, tmp_path):
    src = _copy_source(llama_sharded[0], tmp_path)
    shard = sorted(src.glob("model-*-of-*.safetensors"))[0]
    shard.unlink()
    message = _convert_error(src, tmp_path / "out")
    assert shard.name in message and "missing" in message
    assert "model.safetensors.index.json" in message


def test_index_without_weight_map(llama_sharded, tmp_path):
    src = _copy_source(llama_sharded[0], tmp_path)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    message = _convert_error(src, tmp_path / "out")
    assert "model.safetensors.index.json" in message and "weight_map" in message


def test_garbage_weight_file(opt_src, tmp_path):
    src = _copy_source(opt_src, tmp_path)
    (src / "model.safetensors").write_bytes(os.urandom(4096))
    message = _convert_error(src, tmp_path / "out")
    assert "model.safetensors" in message and "not a readable safetensors file" in message


# ---------------------------------------------------------------------------------------------
# 6. Bad source directories and config.json.


def test_malformed_config_json(opt_src, tmp_path, capsys):
    src = _copy_source(opt_src, tmp_path)
    (src / "config.json").write_text('{"model_type": "opt", "hidden_size": 32,')  # cut short
    dst = tmp_path / "out"
    message = _convert_error(src, dst)
    assert str(src / "config.json") in message and "not readable JSON" in message
    _assert_cli_error(capsys, ["convert", src, dst], "config.json", "not readable JSON")
    _assert_nothing_at(dst)


def test_config_json_not_utf8(opt_src, tmp_path):
    src = _copy_source(opt_src, tmp_path)
    (src / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    message = _convert_error(src, tmp_path / "out")
    assert "config.json" in message and "not readable JSON" in message


def test_config_json_not_an_object(opt_src, tmp_path):
    src = _copy_source(opt_src, tmp_path)
    (src / "config.json").write_text("[]")
    message = _convert_error(src, tmp_path / "out")
    assert "config.json" in message


def test_directory_without_config(opt_src, tmp_path, capsys):
    src = _copy_source(opt_src, tmp_path)
    (src / "config.json").unlink()
    dst = tmp_path / "out"
    message = _convert_error(src, dst)
    assert str(src) in message and "no config.json" in message
    _assert_cli_error(capsys, ["convert", src, dst], "no config.json")
    _assert_nothing_at(dst)


def test_config_without_weights(opt_src, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(opt_src / "config.json", src / "config.json")
    dst = tmp_path / "out"
    message = _convert_error(src, dst)
    assert "has no weights" in message and "model.safetensors" in message
    _assert_cli_error(capsys, ["convert", src, dst], "has no weights")
    _assert_nothing_at(dst)


def test_nonexistent_source(tmp_path, capsys):
    src, dst = tmp_path / "no-such-checkpoint", tmp_path / "out"
    message = _convert_error(src, dst)
    assert str(src) in message and "does not exist" in message
    _assert_cli_error(capsys, ["convert", src, dst], "does not exist")
    _assert_nothing_at(dst)


def test_source_is_a_file(opt_src, tmp_path):
    message = _convert_error(opt_src / "model.safetensors", tmp_path / "out")
    assert "is a file" in message and "directory" in message


def test_bad_dtype(opt_src, tmp_path):
    message = _convert_error(opt_src, tmp_path / "out", dtype="float64")
    assert "'float64'" in message and "bfloat16" in message


# ---------------------------------------------------------------------------------------------
# 7. Pickled checkpoints.


def test_pickle_needs_allow_pickle(opt_pickle, tmp_path, capsys):
    dst = tmp_path / "out"
    message = _convert_error(opt_pickle, dst)
    assert "--allow-pickle" in message and "pytorch_model.bin" in message
    _assert_cli_error(capsys, ["convert", opt_pickle, dst], "--allow-pickle")
    _assert_nothing_at(dst)


def test_pickle_index_needs_allow_pickle(opt_pickle, tmp_path):
    src = _copy_source(opt_pickle, tmp_path)
    (src / "pytorch_model.bin").rename(src / "pytorch_model-00001-of-00001.bin")
    state = torch.load(src / "pytorch_model-00001-of-00001.bin", weights_only=True)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {name: "pytorch_model-00001-of-00001.bin" for name in state}}))
    assert "--allow-pickle" in _convert_error(src, tmp_path / "out")


def test_pickle_with_allow_pickle_matches_hf(opt_pickle, opt_hf, tmp_path, capsys):
    dst = tmp_path / "out"
    rc, out, err = run_cli(capsys, ["convert", opt_pickle, dst, "--allow-pickle"])
    assert rc == 0, err
    assert json.loads((dst / "polar_jax.json").read_text())["dtype"] == "float32"
    _assert_logits_match(dst, opt_hf[1])


def test_sharded_pickle_with_allow_pickle_matches_hf(opt_hf, tmp_path):
    """pytorch_model.bin.index.json naming two .bin shards."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(opt_hf[0] / "config.json", src / "config.json")
    state = opt_hf[1].state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2],
              "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for file, shard_names in shards.items():
        torch.save({n: state[n].clone() for n in shard_names}, src / file)
        weight_map.update({n: file for n in shard_names})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    dst = tmp_path / "out"
    convert_checkpoint(str(src), str(dst), allow_pickle=True)
    _assert_logits_match(dst, opt_hf[1])


def test_truncated_pickle(opt_pickle, tmp_path, capsys):
    src = _copy_source(opt_pickle, tmp_path)
    path = src / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    dst = tmp_path / "out"
    message = _convert_error(src, dst, allow_pickle=True)
    assert str(path) in message and "not a readable PyTorch checkpoint" in message
    _assert_cli_error(capsys, ["convert", src, dst, "--allow-pickle"], "pytorch_model.bin")
    _assert_nothing_at(dst)


@pytest.mark.parametrize("contents, needle", [
    (lambda state: list(state.values()), "it holds a list"),
    (lambda state: {i: t for i, t in enumerate(state.values())}, "it holds the entry 0: Tensor"),
    (lambda state: next(iter(state.values())), "it holds a Tensor"),
    (lambda state: {**state, "step": 3}, "it holds the entry 'step': int"),
    (lambda state: {"state_dict": state}, "it holds the entry 'state_dict': OrderedDict"),
])
def test_odd_pickles_are_refused_in_one_line(opt_pickle, tmp_path, capsys, contents, needle):
    src = _copy_source(opt_pickle, tmp_path)
    torch.save(contents(torch.load(src / "pytorch_model.bin", weights_only=True)),
               src / "pytorch_model.bin")
    dst = tmp_path / "out"
    message = _convert_error(src, dst, allow_pickle=True)
    assert message.startswith(f"{src / 'pytorch_model.bin'} is not a state dict (names to "
                              "tensors)") and needle in message, message
    _assert_cli_error(capsys, ["convert", src, dst, "--allow-pickle"], needle)
    _assert_nothing_at(dst)


@pytest.mark.parametrize("file, eos", [("config.json", "zero"), ("config.json", [2, -1]),
                                       ("generation_config.json", 1.5)])
def test_a_bad_eos_token_id_is_refused_at_convert(opt_src, tmp_path, capsys, file, eos):
    """`generate` would refuse the converted model: convert refuses it, naming the file."""
    src = _copy_source(opt_src, tmp_path)
    settings = json.loads((src / file).read_text()) if (src / file).exists() else {}
    (src / file).write_text(json.dumps(dict(settings, eos_token_id=eos)))
    if file == "config.json":
        (src / "generation_config.json").unlink(missing_ok=True)
    dst = tmp_path / "out"
    message = _convert_error(src, dst)
    assert message.startswith(f"{src / file}: 'eos_token_id' must be an integer >= 0, got "), message
    _assert_cli_error(capsys, ["convert", src, dst], "'eos_token_id'")


def test_pickle_with_missing_tensor(opt_pickle, tmp_path):
    src = _copy_source(opt_pickle, tmp_path)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    del state["model.decoder.final_layer_norm.weight"]
    torch.save(state, src / "pytorch_model.bin")
    message = _convert_error(src, tmp_path / "out", allow_pickle=True)
    assert "missing" in message and "'model.decoder.final_layer_norm.weight'" in message


def test_safetensors_preferred_over_pickle(opt_src, tmp_path):
    """With both present, the safetensors file is read (so no --allow-pickle is needed) and a
    broken pickle beside it does not matter."""
    src = _copy_source(opt_src, tmp_path)
    (src / "pytorch_model.bin").write_bytes(b"not a pickle")
    dst = tmp_path / "out"
    convert_checkpoint(str(src), str(dst))
    assert (dst / "polar_jax.json").exists()


# ---------------------------------------------------------------------------------------------
# 8. Sharded safetensors.


def test_sharded_safetensors_matches_hf(llama_sharded, tmp_path):
    src, hf_model = llama_sharded
    dst = tmp_path / "out"
    assert convert_checkpoint(str(src), str(dst)) == dst
    metadata = json.loads((dst / "polar_jax.json").read_text())
    assert metadata["model_type"] == "llama" and metadata["dtype"] == "float32"
    _assert_logits_match(dst, hf_model)
    # And straight from the HF directory, without converting.
    _assert_logits_match(src, hf_model)


# ---------------------------------------------------------------------------------------------
# 9. An existing DST.


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_existing_dst_needs_force(opt_hf, tmp_path, capsys):
    src, hf_model = opt_hf
    dst = tmp_path / "out"
    (dst / "sub").mkdir(parents=True)
    (dst / "keep.txt").write_text("precious")
    (dst / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    before = _snapshot(dst)

    with pytest.raises(PolarJaxError) as info:
        convert_checkpoint(str(src), str(dst))
    assert str(dst) in str(info.value) and "--force" in str(info.value)
    assert _snapshot(dst) == before
    _assert_cli_error(capsys, ["convert", src, dst], "already exists", "--force")
    assert _snapshot(dst) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]

    rc, out, err = run_cli(capsys, ["convert", src, dst, "--force"])
    assert rc == 0, err
    assert not (dst / "keep.txt").exists() and not (dst / "sub").exists()
    assert (dst / "polar_jax.json").exists() and (dst / "params").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    _assert_logits_match(dst, hf_model)


def test_existing_dst_file_needs_force(opt_hf, tmp_path):
    src, hf_model = opt_hf
    dst = tmp_path / "out"
    dst.write_text("a file")
    with pytest.raises(PolarJaxError, match="--force"):
        convert_checkpoint(str(src), str(dst))
    assert dst.read_text() == "a file"
    convert_checkpoint(str(src), str(dst), force=True)
    assert dst.is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    _assert_logits_match(dst, hf_model)


def test_force_keeps_dst_when_conversion_fails(opt_src, tmp_path):
    """--force replaces DST only with a finished conversion: a bad source leaves it intact."""
    src = _copy_source(opt_src, tmp_path)
    _edit_tensors(src / "model.safetensors",
                  lambda t: t.pop("model.decoder.embed_positions.weight"))
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(PolarJaxError, match="embed_positions"):
        convert_checkpoint(str(src), str(dst), force=True)
    assert _snapshot(dst) == {"keep.txt": b"precious"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_force_replaces_symlinked_dst(opt_src, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    dst = tmp_path / "out"
    dst.symlink_to(target)
    convert_checkpoint(str(opt_src), str(dst), force=True)
    assert (dst / "polar_jax.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ---------------------------------------------------------------------------------------------
# 10. CLI convert + eval perplexity against an independent HF computation.


def _reference_perplexity(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """The documented protocol, written out independently with the HF torch model."""
    total, count = 0.0, 0
    for start in range(0, len(ids), seq_len):
        window = ids[start:start + seq_len]
        if len(window) < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(window[1:])
        total -= logp[torch.arange(len(window) - 1), targets].sum().item()
        count += len(window) - 1
    return math.exp(total / count), count


@pytest.fixture(scope="module")
def bf16_converted(tmp_path_factory):
    """(HF model with its weights rounded to bfloat16, token ids of TEXT, converted dir)
    for a tiny OPT with the shared fixture's 4096-token tokenizer, converted by the CLI."""
    tokenizer_fixture = fixture_path("fixtures", "tiny-opt")
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("cli")
    src = root / "opt-4096"
    # Larger weights than HF's default init, so the logits (and the perplexity) depend
    # strongly on every weight rather than sitting near the uniform distribution.
    model = transformers.OPTForCausalLM(_opt_config(vocab_size=4096, init_std=0.3)).eval()
    model.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_fixture / name, src / name)
    dst = root / "converted"
    assert main(["convert", str(src), str(dst), "--dtype", "bfloat16"]) == 0
    rounded = copy.deepcopy(model).to(torch.bfloat16).to(torch.float32).eval()
    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    return rounded, ids, dst


def _eval_json(capsys, argv) -> dict:
    rc, out, err = run_cli(capsys, argv)
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_cli_convert_bfloat16(bf16_converted):
    _, _, dst = bf16_converted
    metadata = json.loads((dst / "polar_jax.json").read_text())
    assert metadata["dtype"] == "bfloat16" and metadata["model_type"] == "opt"
    assert (dst / "tokenizer.json").exists() and (dst / "config.json").exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.mark.parametrize("max_tokens", [None, 97])
def test_cli_eval_perplexity_matches_hf(bf16_converted, capsys, max_tokens):
    """97 tokens = six windows of 16 and a single leftover token, which is dropped."""
    model, ids, dst = bf16_converted
    seq_len = 16
    assert len(ids) > 100 and len(ids) % seq_len >= 2  # the untruncated run keeps a short window
    text_file = dst.parent / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    argv = ["eval", "perplexity", "--model", dst, "--text", text_file, "--json", "--seq-len", seq_len]
    if max_tokens is not None:
        argv += ["--max-tokens", max_tokens]
    result = _eval_json(capsys, argv)

    expected_ppl, expected_count = _reference_perplexity(model, ids[:max_tokens], seq_len)
    windows = math.ceil(len(ids[:max_tokens]) / seq_len) - (len(ids[:max_tokens]) % seq_len == 1)
    assert result["tokens"] == expected_count
    assert result["windows"] == windows
    if max_tokens == 97:
        assert (result["tokens"], result["windows"]) == (90, 6)
    # The model is far from uniform over its 4096 tokens, so this comparison has teeth.
    assert abs(math.log(expected_ppl) - math.log(4096)) > 0.5
    # float32 agrees to ~2e-6; storing float32 instead of bfloat16 moves it by ~1e-4.
    rel = 2e-5 if result["dtype"] == "float32" else 3e-2  # bfloat16 compute off the CPU
    assert result["perplexity"] == pytest.approx(expected_ppl, rel=rel)
    assert result["nll"] == pytest.approx(math.log(expected_ppl), rel=rel)


# ---------------------------------------------------------------------------------------------
# 11. CLI eval errors.


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_eval_missing_text_file(opt_src, tmp_path, capsys):
    missing = tmp_path / "no-such.txt"
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", opt_src, "--text", missing],
                      str(missing), "does not exist")


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_eval_empty_text_file(opt_src, tmp_path, capsys, content):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", opt_src, "--text", empty],
                      str(empty), "empty")


def test_eval_text_not_utf8(opt_src, tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", opt_src, "--text", path],
                      str(path), "UTF-8")


def test_eval_text_is_a_directory(opt_src, tmp_path, capsys):
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", opt_src, "--text", tmp_path],
                      str(tmp_path))


def test_eval_seq_len_one(opt_src, text_file, capsys):
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", opt_src, "--text", text_file,
                               "--seq-len", "1"], "--seq-len", "must be an integer >= 2")


def test_eval_seq_len_beyond_opt_positions(opt_src, text_file, capsys):
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", opt_src, "--text", text_file,
                               "--seq-len", "65"], "--seq-len 65", "64")


def test_eval_max_tokens_one(opt_src, text_file, capsys):
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", opt_src, "--text", text_file,
                               "--seq-len", "16", "--max-tokens", "1"], "--max-tokens", "must be an integer >= 2")


@pytest.mark.parametrize("value, message", [("0", "must be an integer >= 2, got 0"),
                                            ("-3", "must be an integer >= 2, got -3"),
                                            ("many", "cannot read 'many' as an integer")])
def test_eval_seq_len_rejected_by_argparse(opt_src, text_file, capsys, value, message):
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", opt_src, "--text", text_file,
                               "--seq-len", value], "argument --seq-len", message)


def test_eval_nonexistent_model(tmp_path, text_file, capsys):
    missing = tmp_path / "no-such-model"
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", missing, "--text", text_file],
                      str(missing), "does not exist")


def test_eval_model_without_config(tmp_path, text_file, capsys):
    model_dir = tmp_path / "empty-model"
    model_dir.mkdir()
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", model_dir, "--text", text_file],
                      "no config.json")


def test_eval_model_without_tokenizer(opt_pickle, tmp_path, text_file, capsys):
    dst = tmp_path / "converted"
    convert_checkpoint(str(opt_pickle), str(dst), allow_pickle=True)
    assert not (dst / "tokenizer.json").exists()
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", dst, "--text", text_file,
                               "--seq-len", "16"], "tokenizer")


def test_eval_converted_dir_without_params(opt_src, tmp_path, text_file, capsys):
    dst = tmp_path / "converted"
    convert_checkpoint(str(opt_src), str(dst))
    shutil.rmtree(dst / "params")
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", dst, "--text", text_file,
                               "--seq-len", "16"], "params")


def test_eval_converted_dir_of_an_older_format(opt_src, tmp_path, text_file, capsys):
    """Directories converted before q/k/v and gate/up were fused ask to be converted again."""
    dst = tmp_path / "converted"
    convert_checkpoint(str(opt_src), str(dst))
    metadata = json.loads((dst / "polar_jax.json").read_text())
    (dst / "polar_jax.json").write_text(json.dumps(dict(metadata, format=1)))
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", dst, "--text", text_file,
                               "--seq-len", "16"], "convert the checkpoint again")


def test_eval_hf_dir_runs(opt_src, text_file, capsys):
    """The error tests above use this HF directory: it does evaluate when the input is fine."""
    result = _eval_json(capsys, ["eval", "perplexity", "--model", opt_src, "--text", text_file,
                                 "--json", "--seq-len", "16"])
    assert result["tokens"] > 0 and math.isfinite(result["perplexity"])


# ---------------------------------------------------------------------------------------------
# DST is SRC (failures while writing DST, overlaps, races: tests/test_files_safety.py).


def test_destination_is_the_source(opt_src, tmp_path):
    src = _copy_source(opt_src, tmp_path)
    with pytest.raises(PolarJaxError, match="source checkpoint itself"):
        convert_checkpoint(str(src), str(src), force=True)
    assert (src / "config.json").exists() and (src / "model.safetensors").exists()
