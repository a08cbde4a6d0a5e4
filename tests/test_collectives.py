"""The collectives of the tensor-parallel decode step, counted from the compiled HLO on the
eight CPU devices (compiled only, never run): two all-reduces a layer, at most one more (the
neuron scores summed over `data`) in a sparse layer, no collective-permute and no all-gather
inside a layer, at most two for the rest of the step (the embedding and the argmax)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import run_cli
from models.ops import per_shard
from models.sharding import DATA, MODEL, make_mesh
from polar_jax.bench import collectives
from polar_jax.bench.decode import ARCHS, step_hlo

RNG = np.random.default_rng()
F32 = 4  # bytes: the step sums its partial activations in float32


def test_collectives_are_read_from_compiled_hlo():
    """A program with one of each of three kinds, its sizes known from the shapes."""
    mesh = make_mesh(tp=2, dp=2)
    rows, cols = (2 * int(n) for n in RNG.integers(2, 20, 2))
    x = jax.device_put(RNG.standard_normal((rows, cols), np.float32),
                       NamedSharding(mesh, P(DATA, MODEL)))

    def shard(x):
        total = jax.lax.psum(x, MODEL)
        shifted = jax.lax.ppermute(x, MODEL, [(0, 1), (1, 0)])
        ids = jax.lax.all_gather(jnp.argmax(x, axis=1), DATA, axis=0, tiled=True)
        return total * shifted, ids

    program = jax.jit(per_shard(mesh, shard, P(DATA, MODEL), (P(DATA, MODEL), P(MODEL))))
    found = collectives.collectives(program.lower(x).compile().as_text())
    block = rows // 2 * cols // 2 * 4
    assert found == sorted([collectives.Collective("all-reduce", block),
                            collectives.Collective("collective-permute", block),
                            collectives.Collective("all-gather", rows * 4)])
    assert collectives.counts(found) == {"all-gather": 1, "all-reduce": 1, "collective-permute": 1}


def _check_layer(per_layer, batch: int, hidden: int, small_max: int = 0):
    """Two all-reduces of the activations `[batch, hidden]` float32, and at most one more of at
    most `small_max` bytes; nothing else."""
    rest = list(per_layer)
    for _ in range(2):
        rest.remove(collectives.Collective("all-reduce", batch * hidden * F32))
    assert len(rest) <= (1 if small_max else 0), per_layer
    assert all(c.kind == "all-reduce" and c.bytes <= small_max for c in rest), per_layer


def test_bench_counts_the_tp2_steps_collectives(tmp_path, capsys):
    """`bench decode --tp 2 --collectives` on tiny (an OPT: sparse attention and MLP): per
    layer exactly the two all-reduces of the activations, dense and sparse; outside the layers
    one all-reduce (the embedding's rows, float32) and one all-gather of a (value, id) pair
    per row and device (the argmax), never the logits."""
    out = tmp_path / "collectives.json"
    batch = int(RNG.integers(1, 5))
    rc, stdout, err = run_cli(capsys, ["bench", "decode", "--arch", "tiny", "--tp", 2,
                                       "--batch-sizes", batch, "--mlp-density", 0.5,
                                       "--collectives", "--json", out])
    assert rc == 0, err
    result = json.loads(out.read_text())
    hidden = ARCHS["tiny"]["hidden_size"]
    for mode in ("dense", "sparse"):
        step = result["collectives"][mode]
        assert step["per_layer"]["counts"] == {"all-reduce": 2}
        assert step["per_layer"]["bytes"] == [["all-reduce", batch * hidden * F32]] * 2
        assert step["outside"]["counts"] == {"all-gather": 1, "all-reduce": 1}
        assert sorted(step["outside"]["bytes"]) == [["all-gather", batch * 2 * 2 * F32],
                                                    ["all-reduce", batch * hidden * F32]]
        assert f"{mode:<6} per layer: all-reduce 2 ({batch * hidden * F32} B + " in stdout


def test_sparse_dp2_tp2_adds_only_the_neuron_scores():
    """dp 2 x tp 2, tiny: a sparse layer adds one all-reduce, the scores of the shard's
    neurons summed over `data` (N / tp float32), to the two of the activations."""
    hf = ARCHS["tiny"]
    mesh = make_mesh(tp=2, dp=2)
    batch = 2 * int(RNG.integers(1, 4))
    step = collectives.step_collectives(
        lambda n: step_hlo(hf, n, True, jnp.bfloat16, mesh, batch, 128, 0.5, 0.5))
    _check_layer(step.per_layer, batch // 2, hf["hidden_size"], small_max=hf["ffn_dim"] // 2 * F32)
    assert len(step.per_layer) == 3
    assert collectives.counts(step.outside) == {"all-gather": 1, "all-reduce": 1}


def test_sparse_llama_gqa_tp2_is_two_all_reduces_a_layer():
    """A Llama-family GQA model (gated MLP: sparse attention only, its router's group logits
    computed on every device for its own groups) at tp 2: the two all-reduces a layer."""
    hf = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
              max_position_embeddings=256, hidden_act="silu", rms_norm_eps=1e-5,
              tie_word_embeddings=False)
    batch = int(RNG.integers(1, 5))
    step = collectives.step_collectives(
        lambda n: step_hlo(hf, n, True, jnp.float32, make_mesh(tp=2), batch, 128, 0.5))
    _check_layer(step.per_layer, batch, hf["hidden_size"])
    assert collectives.counts(step.outside) == {"all-gather": 1, "all-reduce": 1}
