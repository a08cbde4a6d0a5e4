"""The Python API refuses bad input in one line (PolarJaxError), before loading or compiling:
prompts of the wrong kind, token ids out of the vocabulary, settings out of range, a model of
the wrong type, settings that do not apply. Also evaluation's position and memory checks.

Every model here is a tiny random Llama (hidden 32, 2 layers, 64 positions) with a word-level
tokenizer, built once per module; `tiny_llama` is shared with test_cli_usability.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import polar_jax  # noqa: E402
import polar_jax.evaluate as evaluate  # noqa: E402
import polar_jax.memory as memory  # noqa: E402
from polar_jax.decode import Decoder  # noqa: E402
from polar_jax.errors import PolarJaxError  # noqa: E402
from polar_jax.loading import load_model, load_tokenizer  # noqa: E402
from polar_jax.sampling import SamplingParams  # noqa: E402

WORDS = ("the a of and to in is it that was he she they we on at by for with as this from or "
         "be are were not but all his her one had said there when what who will more no if out "
         "so up into time only new some could than them these two may first then do any like my "
         "now over such our man me even most made after also did many before").split()
MAX_POSITIONS = 64


def tiny_llama(directory: Path) -> Path:
    """A random GQA Llama (vocabulary: [UNK] and WORDS) saved with a word tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(directory)
    return directory


def random_text(rng, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def decoder(model_dir) -> Decoder:
    return Decoder.load(model_dir, "float32")


def _error(call, *needles: str) -> str:
    """The one-line message of the PolarJaxError that `call()` raises, holding `needles`."""
    with pytest.raises(PolarJaxError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# ---------------------------------------------------------------------------------------------
# Prompts.


def test_a_string_is_one_prompt(decoder):
    rng = np.random.default_rng()
    text = random_text(rng, 6)
    one = polar_jax.generate(decoder, text, max_new_tokens=5)
    listed = polar_jax.generate(decoder, [text], max_new_tokens=5)
    ids = polar_jax.generate(decoder, [decoder.tokenizer(text)["input_ids"]], max_new_tokens=5)
    assert len(one.completions) == 1 and one.completions[0].prompt == text
    assert one.completions[0].tokens == listed.completions[0].tokens == ids.completions[0].tokens
    assert len(one.completions[0].tokens) >= 1


def test_batches_give_what_one_batch_gives(decoder):
    """batch_size splits the prompts; greedy completions do not depend on the split."""
    rng = np.random.default_rng()
    prompts = [rng.integers(1, len(WORDS), size=n).tolist() for n in (3, 7)]
    whole = decoder.generate(prompts, 5)
    split = decoder.generate(prompts, 5, batch_size=1)
    assert split.batch_size == 1 and whole.batch_size == 2
    assert [c.tokens for c in split.completions] == [c.tokens for c in whole.completions]


@pytest.mark.parametrize("prompts, needles", [
    ([], ("prompts must be", "at least one")),
    (None, ("prompts must be",)),
    (5, ("prompts must be",)),
    ({"the": 1}, ("prompts must be",)),
    ([""], ("prompt 0 is empty",)),
    ([[1, 2], []], ("prompt 1 is empty",)),
    (["the man", [1, 2]], ("mix text (prompt 0) and token ids (prompt 1)",)),
    ([5], ("prompt 0 must be a string or a list of token ids", "5")),
    ([[1, -1]], ("token 1 of prompt 0", "in [0, ", "-1")),
    ([[3], [1, 2, len(WORDS) + 1]], ("token 2 of prompt 1", f"in [0, {len(WORDS)}]",
                                     str(len(WORDS) + 1))),
    ([[1, 2.0]], ("token 1 of prompt 0", "an integer", "2.0")),
    ([[1, True]], ("token 1 of prompt 0", "True")),
    ([[1, "2"]], ("token 1 of prompt 0", "'2'")),
    ([np.array([1.0, 2.0])], ("token 0 of prompt 0", "1.0")),
    ([np.ones((2, 2), np.int32)], ("prompt 0 must be a string or a list of token ids",)),
])
def test_bad_prompts(decoder, prompts, needles):
    compiled = set(decoder._compiled)
    _error(lambda: decoder.generate(prompts, 4), *needles)
    _error(lambda: polar_jax.generate(decoder, prompts, max_new_tokens=4), *needles[:1])
    assert set(decoder._compiled) == compiled


def test_numpy_token_ids_are_accepted(decoder):
    rng = np.random.default_rng()
    ids = rng.integers(1, len(WORDS), size=6)
    from_numpy = decoder.generate([ids.astype(np.int64)], 4)
    from_list = decoder.generate([ids.tolist()], 4)
    assert from_numpy.completions[0].tokens == from_list.completions[0].tokens
    assert from_numpy.completions[0].prompt_tokens == ids.tolist()


# ---------------------------------------------------------------------------------------------
# Settings.


@pytest.mark.parametrize("settings, needles", [
    (dict(max_new_tokens=0), ("max_new_tokens must be an integer in [1, ", "got 0")),
    (dict(max_new_tokens=2.5), ("max_new_tokens", "2.5")),
    (dict(max_new_tokens="8"), ("max_new_tokens", "'8'")),
    (dict(max_new_tokens=True), ("max_new_tokens", "True")),
    (dict(batch_size=-2), ("batch_size must be an integer >= 1", "-2")),
    (dict(batch_size=0), ("batch_size", "got 0")),
    (dict(seed=-1), ("seed must be an integer in [0, 4294967295]", "-1")),
    (dict(seed=1.5), ("seed", "1.5")),
    (dict(temperature=-0.5), ("temperature must be a finite number >= 0", "-0.5")),
    (dict(temperature=math.nan), ("temperature", "nan")),
    (dict(temperature=math.inf), ("temperature", "inf")),
    (dict(top_k=-1), ("top_k must be an integer in [0, ", "-1")),
    (dict(top_k=2.5), ("top_k", "2.5")),
    (dict(top_p=0), ("top_p must be a finite number in (0, 1]", "got 0")),
    (dict(top_p=1.5), ("top_p", "1.5")),
    (dict(dtype="float32"), ("dtype='float32' applies only when model is a path",)),
    (dict(routers="r"), ("routers='r' applies only when model is a path",)),
    (dict(attn_topk=0.3), ("attn_topk=0.3 applies only when model is a path",)),
    (dict(router_weights="int8"), ("router_weights='int8' applies only when model is a path",)),
])
def test_bad_settings(decoder, settings, needles):
    compiled = set(decoder._compiled)
    _error(lambda: polar_jax.generate(decoder, "the man", **settings), *needles)
    assert set(decoder._compiled) == compiled


@pytest.mark.parametrize("model", [5, None, object(), ["a/b"]])
def test_model_of_the_wrong_type(model):
    _error(lambda: polar_jax.generate(model, "the"),
           "model must be a directory path (a str or os.PathLike) or a polar_jax.decode.Decoder")


@pytest.mark.parametrize("load_settings, needles", [
    (dict(dtype="int8"), ("dtype must be one of bfloat16, float16, float32", "'int8'")),
    (dict(dtype=jnp.int32), ("dtype must be one of", "'int32'")),
    (dict(dtype=3), ("dtype must be one of", "3")),
    (dict(routers=5), ("routers must be a directory path", "5")),
    (dict(attn_topk=0.3), ("attn_topk=0.3 applies only with routers",)),
    (dict(dense_layers=[1]), ("dense_layers=[1] applies only with routers",)),
    (dict(routers="r", attn_topk=1.5), ("attn_topk must be a finite number in (0, 1]", "1.5")),
    (dict(routers="r", dense_layers=[0, -1]), ("dense_layers[1] must be an integer >= 0",)),
    (dict(router_weights="int8"), ("router_weights='int8' applies only with routers",)),
    (dict(routers="r", router_weights="int4"), ("router_weights must be one of compute, int8",
                                                "'int4'")),
    (dict(max_new_tokens=0), ("max_new_tokens",)),
])
def test_refused_before_the_model_loads(model_dir, monkeypatch, load_settings, needles):
    import polar_jax.loading as loading

    monkeypatch.setattr(loading.ModelDir, "load", lambda *a, **k: pytest.fail("the model loaded"))
    _error(lambda: polar_jax.generate(model_dir, "the man", **load_settings), *needles)


def test_sampling_of_the_wrong_type(decoder):
    _error(lambda: decoder.generate(["the"], 4, {"temperature": 1.0}),
           "sampling must be a polar_jax.sampling.SamplingParams", "dict")
    _error(lambda: decoder.generate(["the"], 4, SamplingParams(top_p=2.0)), "top_p", "2.0")


def test_path_model_and_dtype_by_jnp_dtype(model_dir, decoder):
    rng = np.random.default_rng()
    prompts = [rng.integers(1, len(WORDS), size=4).tolist()]
    out = polar_jax.generate(str(model_dir), prompts, max_new_tokens=4, dtype=jnp.float32)
    assert out.completions[0].tokens == decoder.generate(prompts, 4).completions[0].tokens


def test_generate_memory_refusal_allocates_nothing(model_dir, monkeypatch):
    fresh = Decoder.load(model_dir, "float32")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 10)
    _error(lambda: fresh.generate(["the man"] * 3, 8), "batch size 4", "needs", "GiB",
           "0.00 GiB free", "lower --batch-size or --max-new-tokens")
    assert fresh._compiled == {} and fresh._kv_cache == {}


# ---------------------------------------------------------------------------------------------
# Evaluation.


@pytest.fixture(scope="module")
def loaded(model_dir):
    config, model = load_model(str(model_dir), jnp.float32)
    return model, config, load_tokenizer(str(model_dir))


@pytest.mark.parametrize("settings, needles", [
    (dict(seq_len=1), ("seq_len must be an integer >= 2", "got 1")),
    (dict(seq_len=16.0), ("seq_len", "16.0")),
    (dict(batch_size=0), ("batch_size must be an integer >= 1",)),
    (dict(max_tokens=1), ("max_tokens must be an integer >= 2",)),
    (dict(seq_len=MAX_POSITIONS + 1), (f"--seq-len {MAX_POSITIONS + 1} exceeds the model's "
                                       f"{MAX_POSITIONS} positions (max_position_embeddings)",)),
])
def test_perplexity_refuses_before_compiling(loaded, monkeypatch, settings, needles):
    monkeypatch.setattr(evaluate, "_nll_fn", lambda *a, **k: pytest.fail("compiled"))
    text = random_text(np.random.default_rng(), 100)
    _error(lambda: evaluate.perplexity(*loaded, text, **settings), *needles)


def test_perplexity_memory_refusal(loaded, monkeypatch):
    monkeypatch.setattr(evaluate, "_nll_fn", lambda *a, **k: pytest.fail("compiled"))
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 10)
    text = random_text(np.random.default_rng(), 200)
    _error(lambda: evaluate.perplexity(*loaded, text, seq_len=32, batch_size=4),
           "--seq-len 32 at a batch of 4 windows needs", "attention scores", "logits", "GiB",
           "lower --batch-size or --seq-len")
