"""`ModelDir`: a model directory resolved and read once, whatever is asked of it."""

from __future__ import annotations

import collections
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_path

import convert.checkpoint
import polar_jax.loading as loading
from convert.convert import convert_checkpoint
from models import config_from_hf
from polar_jax.decode import Decoder
from polar_jax.errors import PolarJaxError
from polar_jax.loading import ModelDir


@pytest.fixture
def json_reads(monkeypatch) -> collections.Counter:
    """How often each JSON file of a model directory is read."""
    reads = collections.Counter()
    read = convert.checkpoint.read_checkpoint_file

    def counting(src, name, **kwargs):
        reads[name] += 1
        return read(src, name, **kwargs)

    monkeypatch.setattr(convert.checkpoint, "read_checkpoint_file", counting)
    return reads


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    """{converted: path}: the tiny OPT as Hugging Face stores it and converted to float32."""
    src = fixture_path("fixtures", "tiny-opt")
    dst = tmp_path_factory.mktemp("model-dir") / "converted"
    convert_checkpoint(str(src), str(dst), dtype="float32")
    return {False: src, True: dst}


@pytest.mark.parametrize("converted, stored", [(False, "bfloat16"), (True, "float32")])
def test_everything_is_read_once(directories, json_reads, converted, stored):
    path = directories[converted]
    model_dir = ModelDir.open(path)
    model_dir.load(jnp.float32)
    assert model_dir.tokenizer is model_dir.tokenizer
    assert model_dir.eos_ids == model_dir.eos_ids == (0,)  # generation_config.json's
    expected = {"config.json": 1, "generation_config.json": 1, "tokenizer_config.json": 1}
    if converted:
        expected["polar_jax.json"] = 1
    assert json_reads == expected
    hf_config = json.loads((path / "config.json").read_text())
    assert model_dir.hf_config == hf_config and model_dir.config == config_from_hf(hf_config)
    assert (model_dir.converted, model_dir.stored_dtype) == (converted, np.dtype(jnp.dtype(stored)))
    assert model_dir.tokenizer("the man")["input_ids"]


def test_decoder_opens_the_directory_once(directories, json_reads, monkeypatch):
    resolved = []
    resolve = loading.resolve_source
    monkeypatch.setattr(loading, "resolve_source", lambda path: resolved.append(path) or resolve(path))
    decoder = Decoder.load(str(directories[True]), "float32")
    assert len(resolved) == 1 and json_reads["config.json"] == 1
    assert decoder.eos_ids.tolist() == [0] and decoder.tokenizer is not None
    model_dir = ModelDir.open(directories[True])
    assert Decoder.load(model_dir, "float32").tokenizer is model_dir.tokenizer
    assert len(resolved) == 2 and json_reads["config.json"] == 2


def test_eos_ids_from_config_json_and_checked(directories, tmp_path):
    """Without generation_config.json the EOS ids are config.json's (a list too), checked."""
    hf_config = json.loads((directories[False] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_config, eos_token_id=[2, 5])))
    assert ModelDir.open(tmp_path).eos_ids == (2, 5)
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_config, eos_token_id=-1)))
    with pytest.raises(PolarJaxError, match="config.json: 'eos_token_id' must be an integer >= 0"):
        ModelDir.open(tmp_path).eos_ids
    shutil.copy(directories[False] / "generation_config.json", tmp_path)
    assert ModelDir.open(tmp_path).eos_ids == (0,)  # generation_config.json wins
