"""Polar Sparsity end to end: the kernel decode path against dense decode, teacher-forced
decode against the masked evaluation, and perplexity bounds on the fixtures."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import DEMO, fixture_path, run_optimized_cli
from models.kv_cache import KVCache
from models.sharding import kv_cache_shardings, make_mesh, param_shardings, router_shardings
from polar_jax.cli import main
from polar_jax.decode import Decoder
from polar_jax.errors import PolarJaxError
from polar_jax.sparsity import MaskedOps, SparsityPlan
from polar_jax.step import DecodeState, decode_step
from routers.budget import budget_total
from routers.model import Routers
from test_model_parity import VARIANTS, random_hf_model


def _random_model(name: str, tmp_path_factory):
    _, _, config, model = random_hf_model(VARIANTS[name], tmp_path_factory.mktemp(name))
    routers = Routers.for_model(config, mlp_rank=32, seed=int(np.random.default_rng().integers(1 << 30)))
    return config, model, routers


@pytest.fixture(scope="module", params=["opt-pre-ln", "mistral-sliding-window", "qwen3-gqa-sliding",
                                        "phi3.5-longrope-gqa", "gemma2-gqa", "gemma3-mha-untied"])
def random_model(request, tmp_path_factory):
    return _random_model(request.param, tmp_path_factory)


def _teacher_forced(model, config, tokens, router_state=None, plan=None, mesh=None):
    """Log-probabilities `[T, V]` of a batch-1 sequence decoded one token at a time from an
    empty cache by `decode_step` (sparse with `plan` and `router_state`, `Routers.unstack()`;
    over `mesh` if given), the true next token fed at each step."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, router_state, decode):
        greedy = lambda logits: jnp.argmax(logits, axis=-1)
        _, logits, decode = decode_step(nnx.merge(graphdef, state), decode, greedy, router_state,
                                        plan, mesh)
        return jax.nn.log_softmax(logits[0]), decode.kv_cache

    kv_cache = KVCache.zeros(config, 1, 128, jnp.float32)
    if mesh is not None:
        state = jax.device_put(state, param_shardings(state, mesh))
        kv_cache = jax.device_put(kv_cache, kv_cache_shardings(kv_cache, mesh))
        if router_state is not None:
            router_state = jax.device_put(router_state, router_shardings(router_state, mesh))
    out = []
    for position, token in enumerate(tokens):
        decode = DecodeState(jnp.full(1, token, jnp.int32), jnp.full(1, position, jnp.int32),
                             jnp.ones(1, bool), kv_cache)
        logp, kv_cache = step(state, router_state, decode)
        out.append(np.asarray(logp))
    return np.stack(out)


def _full_plan(config):
    """Sparse code path with nothing left out: every group, every neuron (through the kernels)."""
    return SparsityPlan((None,) * config.num_layers,
                        (None if config.gated_mlp else config.mlp_dim,) * config.num_layers)


def test_sparse_path_with_everything_kept_equals_dense(random_model):
    """Teacher-forced against the dense forward pass of the whole sequence (the dense decode
    step equals it: test_step), then generation against dense generation."""
    config, model, routers = random_model
    tokens = np.random.default_rng().integers(0, config.vocab_size, size=40)
    forward = jax.jit(lambda model, tokens, mask: jax.nn.log_softmax(model(tokens, mask)[0]))
    dense = np.asarray(forward(model, jnp.asarray(tokens)[None], jnp.ones((1, len(tokens)), jnp.int32)))
    sparse = _teacher_forced(model, config, tokens, routers.unstack(), _full_plan(config))
    # float32: within 1e-5 of the largest logit (the kernels sum in another order than XLA)
    np.testing.assert_allclose(sparse, dense, atol=1e-5 * np.abs(dense).max(), rtol=0)
    # The same through the whole generation loop: identical tokens.
    prompts = [np.random.default_rng().integers(0, config.vocab_size, size=n).tolist() for n in (5, 13, 2)]
    plain = Decoder(config, model).generate(prompts, 12)
    full = lambda batch: _full_plan(config)
    decoder = Decoder(config, model, routers=routers, plan_for_batch=full)
    # The MLP router's second projection: int8 by default where there is one (non-gated MLPs)
    assert decoder.router_weights == ("compute" if config.gated_mlp else "int8")
    kernels = decoder.generate(prompts, 12)
    assert [c.tokens for c in kernels.completions] == [c.tokens for c in plain.completions]
    if config.gated_mlp:
        with pytest.raises(PolarJaxError, match="these routers have no MLP router"):
            Decoder(config, model, routers=routers, plan_for_batch=full, router_weights="int8")


def random_budget(config, attn_topk: float, shards: int, rng) -> list[int]:
    """Random per-layer group counts, multiples of `shards` in [shards, Hkv], summing to the
    budget of `attn_topk` (`budget_total`)."""
    counts = [shards] * config.num_layers
    for _ in range((budget_total(config, attn_topk, shards) - sum(counts)) // shards):
        room = [i for i, k in enumerate(counts) if k < config.num_kv_heads]
        counts[rng.choice(room)] += shards
    return counts


@pytest.mark.parametrize("tp, int8, budget", [(1, False, False), (1, False, True),
                                              (2, False, False), (2, True, False),
                                              (2, False, True)])
def test_teacher_forced_decode_equals_sparse_evaluation(random_model, tp, int8, budget):
    """The decode path (Pallas kernels, interpret mode on CPU) and the masked evaluation give
    the same next-token log-probabilities at every position; at tp 2 the decode runs split over
    two devices, each selecting among its own groups and neurons, and the evaluation applies
    the same per-shard rule on one device. `int8`: both read the MLP router's second
    projection as int8 rows and scales (split over the devices with the neurons). `budget`:
    low-rank SiLU attention routers with a local probe of 2-8 positions (random weights; the
    window within the models' own sliding windows) and a calibrated per-layer budget in their
    metadata (a random one averaging 0.75 of the groups, multiples of tp), which the plan
    follows."""
    config, model, routers = random_model
    if int8 and config.gated_mlp:
        pytest.skip("int8 router weights apply to an MLP router (non-gated MLPs)")
    if budget and config.gated_mlp and config.num_kv_heads == tp:
        pytest.skip(f"{config.num_kv_heads} KV groups at tp {tp} and a gated MLP: the budget "
                    "leaves nothing to select, the plain tp 2 case runs the same dense path")
    rng = np.random.default_rng()
    metadata = {"mlp_topk": {"1": [config.mlp_dim // 4] * config.num_layers}}
    topk, dense_layers = 0.5, (0,)
    if budget:
        routers = Routers.for_model(config, mlp_rank=32, seed=int(rng.integers(1 << 30)),
                                    attn_rank=8, attn_activation="silu",
                                    attn_probe=int(rng.integers(2, 9)))
        routers.probe_w.value = jnp.asarray(rng.normal(0, 2, routers.probe_w.shape), jnp.float32)
        topk, dense_layers = 0.75, None
        counts = random_budget(config, topk, tp, rng)
        metadata.update(attn_topk=topk, attn_groups_per_layer=counts)
    router_state = routers.unstack(int8_mlp_up=int8)
    plan = SparsityPlan.build(config, metadata, attn_topk=topk, dense_layers=dense_layers,
                              mlp_batch_size=1, shards=tp)
    if budget:
        groups = config.num_kv_heads // tp
        assert plan.attn_groups == tuple(None if k // tp == groups else k // tp for k in counts)
    else:
        # (Mistral's 2 groups at tp 2: one per device, nothing to select: the sharded kernels
        # run dense.)
        assert any(k is not None for k in plan.attn_groups) == (config.num_kv_heads // tp > 1)
    assert config.gated_mlp or all(k == config.mlp_dim // 4 // tp for k in plan.mlp_neurons)
    tokens = np.random.default_rng().integers(0, config.vocab_size, size=32)
    decoded = _teacher_forced(model, config, tokens, router_state, plan,
                              make_mesh(tp) if tp > 1 else None)
    mask = jnp.ones((1, len(tokens)), jnp.int32)
    ops = MaskedOps(mask, "sparse", plan, config.num_kv_heads, router_state)
    out = model.forward(jnp.asarray(tokens)[None], jnp.arange(len(tokens))[None], ops)
    evaluated = np.asarray(jax.nn.log_softmax(model.logits(out.hidden_states[0])))
    np.testing.assert_allclose(decoded, evaluated, atol=1e-4, rtol=0)
    dense = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens)[None], mask)[0]))
    if any(k is not None for k in plan.attn_groups + plan.mlp_neurons):
        assert np.abs(dense - evaluated).max() > 1e-2  # the sparsity did change something


def _eval(name: str, routers_dir, mode: str, *extra: str) -> dict:
    """`eval perplexity --mode MODE` of the fixture over the first 16,384 tokens of WikiText-2
    test (test_perplexity checks the dense evaluation against Hugging Face on 65,536)."""
    return run_optimized_cli(["eval", "perplexity", "--model", fixture_path("fixtures", name),
                              "--text", fixture_path("data", "wikitext2_test.txt"),
                              "--max-tokens", "16384", "--dtype", "float32", "--mode", mode,
                              "--attn-topk", "0.5", "--routers", routers_dir, *extra])


@pytest.mark.parametrize("name, bound", [
    pytest.param("tiny-llama", 1.14, marks=pytest.mark.routers("tiny-llama")),
    pytest.param("tiny-opt", 1.20, marks=pytest.mark.routers("tiny-opt"))])
def test_fixture_sparse_perplexity_bounds(name, bound, trained_routers):
    """Against the dense perplexity over the same 16,352 tokens: sparse 1.076 (tiny-llama) and
    1.166 (tiny-opt, its routers' one epoch; two: 1.161) times it, at routers seed 0 (over
    65,408 tokens, two epochs: 1.056 and 1.146); the oracle's at most the sparse one. One evaluation (`--with-oracle`: dense, oracle and sparse
    on the same windows, each equal to its own run: test_router_budget)."""
    _, routers_dir = trained_routers(name)
    result = _eval(name, routers_dir, "sparse", "--with-oracle")
    assert result["tokens"] == 16352
    assert result["oracle_perplexity"] <= result["perplexity"] <= bound * result["dense_perplexity"]
    assert result["mode"] == "sparse" and result["attn_topk"] == 0.5


def test_bench_decode_smoke(tmp_path, capsys):
    """`polar-jax bench decode --arch tiny --steps 2` runs the dense and sparse decode loops
    (kernels in interpret mode) and writes its rows; no timing is asserted."""
    out = tmp_path / "rows.json"
    assert main(["bench", "decode", "--arch", "tiny", "--steps", "2", "--repeats", "1",
                 "--batch-sizes", "2", "--context-lens", "64,128", "--attn-topk", "0.5",
                 "--mlp-density", "0.5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 2 and all(np.isfinite([r["dense_ms"], r["sparse_ms"]]).all() for r in rows)
    assert all(r["mlp_neurons"] == 128 and r["dense_roofline_ms"] > 0 for r in rows)
    assert result["meta"]["router_weights"] == "int8"  # the default for a non-gated MLP
    peer = result["meta"]["peer"]  # torch is installed with the test extra
    assert peer.get("mode") == "eager" and all(r["torch_ms"] > 0 for r in rows), peer


def test_bench_decode_breakdown_smoke(tmp_path):
    """`--breakdown` profiles one dense and one sparse loop and attributes the device time to
    the model's named parts (code path only: on the CPU the thunks stand in for kernels); the
    MLP router's second projection in the compute dtype (int8 by default:
    test_bench_decode_smoke)."""
    out = tmp_path / "rows.json"
    assert main(["bench", "decode", "--arch", "tiny", "--steps", "2", "--repeats", "1",
                 "--batch-sizes", "2", "--context-lens", "64", "--attn-topk", "0.5",
                 "--mlp-density", "0.5", "--peer", "off", "--breakdown", "--router-weights",
                 "compute", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["meta"]["router_weights"] == "compute"
    dense, sparse = (row["breakdown_us_per_layer"][m]["parts"] for m in ("dense", "sparse"))
    assert {"attention", "mlp", "qkv_proj", "norm"} <= dense.keys()
    assert {"attention", "mlp", "attn_router", "mlp_router"} <= sparse.keys()
    assert all(v >= 0 for v in [*dense.values(), *sparse.values()])


@pytest.mark.routers("tiny-opt")
def test_bench_decode_real_checkpoint_with_trained_routers(tmp_path, trained_routers):
    """`--model M --routers R` times a real checkpoint: each layer's MLP k is the routers'
    calibrated k for the batch-size bucket (dense where k >= 0.8 N), as in generation."""
    _, routers_dir = trained_routers("tiny-opt")
    out = tmp_path / "rows.json"
    assert main(["bench", "decode", "--model", str(fixture_path("fixtures", "tiny-opt")),
                 "--routers", str(routers_dir), "--batch-sizes", "3", "--context-lens", "64",
                 "--steps", "2", "--repeats", "1", "--attn-topk", "0.5", "--peer", "off",
                 "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    table = json.loads((routers_dir / "routers.json").read_text())["mlp_topk"]["4"]  # bucket >= 3
    n = 1024
    assert row["mlp_neurons_per_layer"] == [None if k >= 0.8 * n else k for k in table]
    assert row["arch"] == "tiny-opt" and np.isfinite([row["dense_ms"], row["sparse_ms"]]).all()


DEMO_MODEL = str(DEMO / "tiny-opt")


@pytest.mark.parametrize("argv, message", [
    (["--arch", "tiny", "--routers", "r"], "--routers needs --model"),
    (["--model", DEMO_MODEL, "--layers", "2"], "--layers applies to built-in --arch shapes only"),
    (["--model", DEMO_MODEL, "--context-lens", "2000"], f"need 2033 positions; {DEMO_MODEL} has 1024"),
    (["--arch", "llama-2-7b", "--router-weights", "int8"],
     "--router-weights int8 applies to the MLP router of a non-gated MLP"),
])
def test_bench_decode_bad_arguments(argv, message, capsys):
    assert main(["bench", "decode", "--peer", "off", "--batch-sizes", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("tied", [False, True])
def test_step_bytes_count_what_a_step_reads(tied):
    """The roofline's bytes: every weight except the tables a step reads only the batch's rows
    of (learned positions; the token embedding when the head is untied), plus K and V of the
    groups each layer reads up to the context; sparse adds the routers, drops unread rows."""
    from models import config_from_hf
    from polar_jax.bench.decode import random_state, step_bytes

    hf = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, hidden_act="silu", rms_norm_eps=1e-5,
              tie_word_embeddings=tied)
    config = config_from_hf(hf)
    _, state = random_state(config, jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    weights = sum(int(np.prod(x.shape)) * 2 for x in leaves) - (0 if tied else 96 * 32 * 2)
    batch, context, kv_layer = 3, 50, 2 * 3 * 2 * 50 * 8 * 2  # K and V, B, Hkv, S, D, bf16
    routers = Routers.for_model(config, 16).unstack(jnp.bfloat16)
    plan = SparsityPlan.build(config, None, 0.5, (0,), batch)  # layer 1 reads 1 of 2 groups
    got = step_bytes(config, state, routers, plan, batch, context, jnp.bfloat16)
    # Layer 0 (dense attention, gated MLP) runs no router.
    router_bytes = sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves(routers[1]))
    assert got.dense == weights + 2 * kv_layer
    assert got.sparse == weights + router_bytes + kv_layer + kv_layer // 2
    assert got.fixed == weights - sum(int(np.prod(x.shape)) * 2 for x in
                                      jax.tree.leaves(nnx.to_pure_dict(state)["layers"]))
