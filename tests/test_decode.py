"""The batched decoder: token-for-token equal to Hugging Face greedy generation on ragged
batches, sampling semantics, no recompilation for new settings, stopping, and input errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flax import nnx

import polar_jax.memory as memory
from conftest import fixture_path
from models import build_model, config_from_hf
from models.sharding import make_mesh
from polar_jax.cli import main
from polar_jax.decode import Decoder, bucket_shape
from polar_jax.errors import PolarJaxError
from polar_jax.loading import load_model
from polar_jax.sampling import SamplingParams, _filtered_logits
from test_model_parity import VARIANTS, _randomize, random_hf_model

PROMPT_LENGTHS = (3, 17, 40, 129)
NEW_TOKENS = 32


def _hf_greedy(hf, prompt: list[int], max_new: int) -> list[int]:
    """HF greedy generation of one prompt alone; the new ids up to and including EOS."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                          do_sample=False, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    eos = hf.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    for i, t in enumerate(new):
        if t in eos:
            return new[:i + 1]
    return new


def _compile_counter():
    """A list that grows by one name per program lowered for XLA from now on (a compilation,
    whether or not the persistent compilation cache then finds it)."""
    events = []

    def listener(name, duration, **kwargs):
        if name.endswith("jaxpr_to_mlir_module_duration"):
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


# Mistral's window (48) is shorter than the longest prompt plus its generation. Phi-3's MHA
# variant runs the model its longrope variant runs (the suite's time).
DECODE_VARIANTS = {name: spec for name, spec in VARIANTS.items() if name != "phi3-mha-sliding"}
DECODE_VARIANTS["mistral-sliding-window"] = (
    "MistralConfig", "MistralForCausalLM",
    dict(VARIANTS["mistral-sliding-window"][2], sliding_window=48))


@pytest.fixture(scope="module", params=sorted(DECODE_VARIANTS))
def random_model(request, tmp_path_factory):
    hf, _, config, model = random_hf_model(DECODE_VARIANTS[request.param],
                                           tmp_path_factory.mktemp(request.param))
    eos = hf.generation_config.eos_token_id
    return hf, Decoder(config, model, eos_ids=[eos] if isinstance(eos, int) else eos or [])


# The variants also decoded over a dp 2 x tp 2 mesh: learned positions, GQA with llama3 rope,
# a sliding window. (Every variant's sharded logits: test_model_parity; each costs a compile,
# ~4 CPU-seconds.)
SHARDED_DECODE = ("opt-pre-ln", "llama-3.1-gqa", "mistral-sliding-window")


def test_greedy_equals_hf_on_ragged_batch(random_model, request):
    """One device, and for `SHARDED_DECODE` the same model split over a dp 2 x tp 2 mesh of
    CPU devices."""
    hf, decoder = random_model
    rng = np.random.default_rng()
    prompts = [rng.integers(3, hf.config.vocab_size, size=n).tolist() for n in PROMPT_LENGTHS]
    expected = [_hf_greedy(hf, prompt, NEW_TOKENS) for prompt in prompts]
    out = decoder.generate(prompts, NEW_TOKENS)
    assert [c.tokens for c in out.completions] == expected
    if request.node.callspec.params["random_model"] not in SHARDED_DECODE:
        return
    sharded = Decoder(decoder.config, nnx.merge(decoder.graphdef, decoder.state),
                      eos_ids=decoder.eos_ids.tolist(), mesh=make_mesh(tp=2, dp=2))
    assert [c.tokens for c in sharded.generate(prompts, NEW_TOKENS).completions] == expected


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_fixture_greedy_equals_hf(name):
    src = fixture_path("fixtures", name)
    decoder = Decoder.load(str(src), jnp.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    text = fixture_path("data", "wikitext2_test.txt").read_text().split()
    rng = np.random.default_rng()
    prompts = []
    for n in PROMPT_LENGTHS:  # real text, cut to about n tokens
        start = int(rng.integers(0, len(text) - 200))
        prompts.append(decoder.tokenizer(" ".join(text[start:start + n]))["input_ids"][:n])
    out = decoder.generate(prompts, NEW_TOKENS)
    for prompt, completion in zip(prompts, out.completions):
        assert completion.tokens == _hf_greedy(hf, prompt, NEW_TOKENS)


def test_cli_generate_matches_hf_per_prompt(tmp_path, capsys):
    """Acceptance: `polar-jax generate --prompts-file P --json` gives HF's greedy ids."""
    src = fixture_path("fixtures", "tiny-llama")
    prompts = ["The history of", "In 1999 the band released their second album , which",
               "Hello", "= Robert Boulter = Robert Boulter is an English film , television "
               "and theatre actor . He had a guest @-@ starring role on the television series"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    assert main(["generate", "--model", str(src), "--prompts-file", str(prompts_file),
                 "--max-new-tokens", str(NEW_TOKENS), "--dtype", "float32", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["prompt"] for line in lines[:-1]] == prompts
    assert lines[-1]["batch_size"] == 4 and lines[-1]["tokens_per_second"] > 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    for prompt, line in zip(prompts, lines):
        assert line["tokens"] == _hf_greedy(hf, tokenizer(prompt)["input_ids"], NEW_TOKENS)
        assert line["completion"] == tokenizer.decode(line["tokens"], skip_special_tokens=True)
    assert lines[-1]["new_tokens"] == sum(len(line["tokens"]) for line in lines[:-1])


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    """A small random Llama (GQA) with strongly varying logits, for the sampling tests."""
    config = transformers.LlamaConfig(**DECODE_VARIANTS["llama-3.1-gqa"][2])
    hf = transformers.LlamaForCausalLM(config).eval()
    _randomize(hf, seed=7)
    src = tmp_path_factory.mktemp("sampling") / "hf"
    hf.save_pretrained(src)
    config, model = load_model(str(src), dtype=jnp.float32)
    return Decoder(config, model, eos_ids=[])


def _prompts(rng, lengths=(5, 9, 14)):
    return [rng.integers(0, 512, size=n).tolist() for n in lengths]


def test_sampling_is_reproducible_and_settings_do_not_recompile(tiny_decoder):
    rng = np.random.default_rng()
    prompts = _prompts(rng)
    settings = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    first = tiny_decoder.generate(prompts, 24, settings, seed=3)
    compiles = _compile_counter()
    again = tiny_decoder.generate(prompts, 24, settings, seed=3)
    assert [c.tokens for c in again.completions] == [c.tokens for c in first.completions]
    other_seed = tiny_decoder.generate(prompts, 24, settings, seed=4)
    assert [c.tokens for c in other_seed.completions] != [c.tokens for c in first.completions]
    for params in (SamplingParams(0.7, 0, 1.0), SamplingParams(1.3, 5, 0.5), SamplingParams()):
        tiny_decoder.generate(prompts, 17, params, seed=11)
    # A new batch of another size and other prompt lengths within the same buckets.
    tiny_decoder.generate(_prompts(rng, (7, 3, 2, 16)), 20, settings, seed=1)
    assert compiles == [], "changing sampling settings, seed or sizes within a bucket recompiled"


def test_sampled_tokens_over_a_mesh_equal_one_devices(tiny_decoder):
    """dp 2 x tp 2 (the vocabulary split, each row's cut decided from per-shard candidates):
    the same seed and settings draw one device's tokens."""
    rng = np.random.default_rng()
    prompts = _prompts(rng)
    sharded = Decoder(tiny_decoder.config, nnx_merge(tiny_decoder), mesh=make_mesh(tp=2, dp=2))
    for settings in (SamplingParams(1.0, 50, 0.9), SamplingParams(0.8, 0, 0.95)):
        seed = int(rng.integers(1 << 30))
        one = tiny_decoder.generate(prompts, 16, settings, seed=seed)
        split = sharded.generate(prompts, 16, settings, seed=seed)
        assert [c.tokens for c in split.completions] == [c.tokens for c in one.completions]


def test_top_k_one_and_a_tiny_top_p_equal_greedy(tiny_decoder):
    """top_p below float32's normal range (1e-38 flushes to 0) still keeps the best token."""
    prompts = _prompts(np.random.default_rng())
    greedy = tiny_decoder.generate(prompts, 20)
    for params in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(1.0, 0, 1e-38)):
        sampled = tiny_decoder.generate(prompts, 20, params, seed=5)
        assert [c.tokens for c in sampled.completions] == [c.tokens for c in greedy.completions]


def test_filtered_logits_against_numpy():
    rng = np.random.default_rng()
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    for temperature, top_k, top_p in [(1.0, 5, 1.0), (0.5, 0, 0.7), (2.0, 10, 0.3), (1.0, 0, 1.0),
                                      (1.0, 0, 1e-40)]:
        got = np.asarray(_filtered_logits(jnp.asarray(logits),
                                          SamplingParams(temperature, top_k, top_p).validated()))
        for row in range(4):
            scaled = logits[row].astype(np.float64) / temperature
            order = np.argsort(-scaled)
            keep = order[:top_k] if top_k else order
            probs = np.exp(scaled[keep] - scaled[keep].max())
            probs /= probs.sum()
            # Nucleus: the smallest prefix of the ranking whose mass reaches top_p.
            mass_before = np.cumsum(probs) - probs
            expected = set(keep[mass_before < top_p].tolist()) | {keep[0]}  # never empty
            assert set(np.flatnonzero(np.isfinite(got[row])).tolist()) == expected
            kept = sorted(expected)
            np.testing.assert_allclose(got[row, kept], scaled[kept], rtol=1e-6)


def test_eos_ends_one_sequence_while_others_continue(tiny_decoder):
    rng = np.random.default_rng()
    prompts = _prompts(rng, (6, 11, 4))
    free = tiny_decoder.generate(prompts, 24)
    tokens = free.completions[1].tokens
    # Choose as EOS a token that row 1 produces at step 5 and that no row produced earlier.
    candidates = [t for t in tokens[5:12] if all(t not in c.tokens[:6] for c in free.completions)]
    if not candidates:
        pytest.skip("no usable EOS candidate in this draw")
    eos = candidates[0]
    stopping = Decoder(tiny_decoder.config, nnx_merge(tiny_decoder), eos_ids=[eos])
    out = stopping.generate(prompts, 24)
    for free_c, stop_c in zip(free.completions, out.completions):
        if eos in free_c.tokens:
            end = free_c.tokens.index(eos) + 1
            assert stop_c.tokens == free_c.tokens[:end]
        else:
            assert stop_c.tokens == free_c.tokens and len(stop_c.tokens) == 24
    assert len(out.completions[1].tokens) < 24


def nnx_merge(decoder):
    from flax import nnx

    return nnx.merge(decoder.graphdef, decoder.state)


def test_bucketing():
    shape = bucket_shape(5, 40, 32)
    assert (shape.batch, shape.prompt_len, shape.max_new) == (8, 64, 32)
    assert shape.cache_len % 128 == 0 and shape.cache_len >= 96
    assert bucket_shape(6, 33, 20) == shape
    assert bucket_shape(3, 700, 100).prompt_len == 1024


def test_memory_estimate_refuses_oversized_batch(tiny_decoder, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    prompts = [[1] * 300] * 64
    with pytest.raises(PolarJaxError, match=r"batch size 64 .*GiB.* free"):
        Decoder(tiny_decoder.config, nnx_merge(tiny_decoder)).generate(prompts, 100)


def test_generation_across_the_longrope_switch_is_refused():
    """Phi-3.5 switches to its long rope factors past the original context, where Hugging Face
    recomputes the cache: a generation that would cross it is refused in one line (the prompts
    of the ragged-batch test lie on either side of it)."""
    spec = DECODE_VARIANTS["phi3.5-longrope-gqa"][2]
    config = config_from_hf(dict(spec, model_type="phi3"))
    decoder = Decoder(config, build_model(config, jnp.float32, abstract=False))
    switch = spec["original_max_position_embeddings"]
    with pytest.raises(PolarJaxError) as info:
        decoder.generate([[1, 2], [3] * (switch - 5)], 6)
    assert str(info.value) == (
        f"prompt 1 ({switch - 5} tokens) plus 6 new tokens crosses the model's longrope switch at "
        f"{switch} positions, which needs the cache recomputed with the long factors (not "
        f"supported); lower --max-new-tokens to 5 or give a prompt longer than {switch} tokens")
    decoder.check_lengths([switch - 5, switch + 1], 5)  # up to it, and from past it: accepted


def test_prompt_longer_than_the_model_is_refused(tiny_decoder):
    limit = tiny_decoder.config.max_position_embeddings
    with pytest.raises(PolarJaxError, match=rf"prompt 1 has {limit + 1} tokens.*maximum is {limit}"):
        tiny_decoder.generate([[1, 2], [3] * (limit + 1)], 4)


def test_cli_generate_errors(tmp_path, capsys):
    src = fixture_path("fixtures", "tiny-opt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    cases = [
        (["--prompts-file", str(empty)], "is empty"),
        (["--prompts-file", str(tmp_path / "missing.txt")], "does not exist"),
        (["--prompt", "hi", "--top-p", "0"], "argument --top-p: must be a finite number in (0, 1]"),
        (["--prompt", "hi", "--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
        (["--prompt", "hi " * 1100], "maximum is 1024 positions"),
        (["--prompt", "hi " * 480, "--max-new-tokens", "100"], "learned positions"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["generate", "--model", str(src), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_package_level_generate(tmp_path):
    """`polar_jax.generate` is the documented Python entry point (given a path or a
    `Decoder`)."""
    import polar_jax

    src = fixture_path("fixtures", "tiny-opt")
    decoder = Decoder.load(str(src), jnp.float32)
    for model, dtype, prompts in ((str(src), jnp.float32, ["The history of", "Once upon"]),
                                  (decoder, None, [[5, 6, 7], [9, 8]])):  # (its compile shared)
        out = polar_jax.generate(model, prompts, max_new_tokens=6, dtype=dtype)
        greedy = decoder.generate(prompts, 6)
        assert [c.tokens for c in out.completions] == [c.tokens for c in greedy.completions]
        assert [c.prompt for c in out.completions] == [p if isinstance(p, str) else None
                                                      for p in prompts]
        assert out.new_tokens == sum(len(c.tokens) for c in out.completions)
