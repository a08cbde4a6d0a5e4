"""`bench decode --tp --dp` on the eight CPU devices: a run over a mesh writes its rows, bad
splits are refused in one line, the roofline counts one device's bytes, and the breakdown
gives collectives a part of their own."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import run_cli
from models import build_model, config_from_hf, scopes
from models.ops import per_shard, psum
from models.sharding import (
    DATA,
    MODEL,
    make_mesh,
    param_shardings,
    replicated,
    router_shardings,
)
from polar_jax.bench.decode import random_arrays, step_bytes, with_shardings
from polar_jax.bench.trace import ALL_REDUCE, COLLECTIVE, hlo_scopes, scope_breakdown, tracing
from polar_jax.sparsity import SparsityPlan
from routers.model import Routers

RNG = np.random.default_rng()


def test_decode_over_a_mesh_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc, stdout, err = run_cli(capsys, [
        "bench", "decode", "--arch", "tiny", "--tp", 2, "--dp", 2, "--batch-sizes", 2,
        "--context-lens", 64, "--steps", 2, "--repeats", 1, "--attn-topk", 0.5,
        "--mlp-density", 0.5, "--peer", "off", "--json", out])
    assert rc == 0, err
    result = json.loads(out.read_text())
    assert result["meta"]["tp"] == 2 and result["meta"]["dp"] == 2
    [row] = result["rows"]
    assert (row["tp"], row["dp"], row["batch"], row["context"]) == (2, 2, 2, 64)
    # tiny: 256 neurons, --mlp-density 0.5 -> 128 for the step, 64 chosen on each shard
    assert row["mlp_neurons_per_layer"] == [128, 128]
    # Times are only finite here: (t(2N) - t(N)) / N of a 2-step CPU run can come out negative.
    assert np.isfinite([row["dense_ms"], row["sparse_ms"]]).all() and row["dense_roofline_ms"] > 0
    assert "--tp 2 --dp 2" in stdout


@pytest.mark.parametrize("argv, message", [
    (["--tp", "3"], "--tp 3 must divide the model's 4 KV groups and 256 MLP neurons; choose "
                    "--tp from 1, 2, 4"),
    (["--tp", "16"], "--tp 16 x --dp 1 needs 16 devices; 8 are visible (cpu)"),
])
def test_bad_split_is_refused_in_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc, stdout, err = run_cli(capsys, ["bench", "decode", "--arch", "tiny", "--peer", "off",
                                       "--json", out, *argv])
    assert rc == 2 and stdout == ""
    assert err == f"polar-jax: error: {message}\n"
    assert not out.exists()


def test_random_arrays_are_made_in_their_shards():
    mesh = make_mesh(tp=2, dp=2)
    split = NamedSharding(mesh, P(DATA, MODEL))
    abstract = [jax.ShapeDtypeStruct((4, 6), jnp.bfloat16, sharding=split),
                jax.ShapeDtypeStruct((3,), jnp.float32)]
    made = random_arrays(abstract, int(RNG.integers(1 << 30)), 0.5)
    assert made[0].sharding == split and made[0].addressable_shards[0].data.shape == (2, 3)
    assert made[1].sharding.is_fully_replicated and made[1].dtype == jnp.float32
    assert 0 < float(jnp.std(made[0].astype(jnp.float32))) < 2  # normal x 0.5


@pytest.mark.parametrize("int8", [False, True])
def test_step_bytes_count_one_devices_reads(int8):
    """tp 2 x dp 2, an OPT-shaped model (learned positions, tied head, ungated MLP), counted by
    hand: a device reads its vocabulary half of the embedding, its KV groups' and neurons'
    halves of the layers, the norms and residual biases whole; the K and V of its batch rows
    and groups; the routers' first projection whole and its neurons' half of the second; a
    sparse step only the selected groups and (per shard) neurons; `int8`: the second projection
    at a byte per weight plus a float32 scale per neuron."""
    hf = dict(model_type="opt", vocab_size=96, hidden_size=32, ffn_dim=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=128, activation_function="relu",
              do_layer_norm_before=True)
    config = config_from_hf(hf)
    mesh = make_mesh(tp=2, dp=2)
    _, abstract = nnx.split(build_model(config, jnp.bfloat16))
    state = with_shardings(abstract, param_shardings(abstract, mesh))
    routers = jax.eval_shape(lambda: Routers.for_model(config, 16).unstack(jnp.bfloat16, int8))
    routers = with_shardings(routers, router_shardings(routers, mesh))
    batch, context = 4, 50
    topk = [int(k) for k in RNG.integers(2, 100, 2)]  # global; ceil(k / 2) per shard
    plan = SparsityPlan.build(config, {"mlp_topk": {"4": topk}}, 0.5, (0,), batch, shards=2)
    got = step_bytes(config, state, routers, plan, batch, context, jnp.bfloat16, mesh)

    d, bf16 = 32, 2
    layer = (2 * d + 32 * 4 * 3 * 8 // 2 + 4 * 3 * 8 // 2 + 4 * 8 * 32 // 2 + d  # norm, qkv, o
             + 2 * d + 128 * d // 2 + 128 // 2 + 128 * d // 2 + d) * bf16  # norm, in, out
    fixed = (96 * d // 2 + 2 * d) * bf16  # the embedding's vocabulary half, final norm
    weights = fixed + 2 * layer  # (positions: a step reads only its rows)
    kv_layer = 2 * (batch // 2) * (4 // 2) * context * 8 * bf16  # K and V, B, Hkv, S, D
    mlp_up = 64 * 16 + 64 * 4 if int8 else 64 * 16 * bf16  # its 64 neurons' (and scales)
    router_bytes = 2 * ((d * (4 + 16) + 4) * bf16 + mlp_up)  # layers x (w_in, attn_b, mlp_up)
    mlp_rows = 2 * 64 * d * bf16  # w_in and w_out of its 64 neurons
    unread = sum(mlp_rows * (64 - -(-k // 2)) // 64 for k in topk)
    assert got.dense == weights + 2 * kv_layer
    assert got.sparse == weights + router_bytes + kv_layer + kv_layer // 2 - unread
    assert got.fixed == fixed


def test_breakdown_counts_collectives_as_their_own_part():
    """XLA's all-reduce of a split matmul and a `psum` inside `shard_map` (each inheriting the
    `mlp` scope) count as all_reduce, once per device; NCCL kernels known by name only too."""
    mesh = make_mesh(tp=2)
    x = jax.device_put(RNG.standard_normal((8, 64), np.float32), NamedSharding(mesh, P(None, MODEL)))
    w = jax.device_put(RNG.standard_normal((64, 16), np.float32), NamedSharding(mesh, P(MODEL)))

    @functools.partial(jax.jit, out_shardings=replicated(mesh))
    def split(x, w):
        with jax.named_scope(scopes.MLP):
            total = per_shard(mesh, lambda x: psum(x, MODEL, mesh), P(None, MODEL), P())(x)
            return x @ w, total

    hlo = split.lower(x, w).compile().as_text()
    collectives = {name for name, part in hlo_scopes(hlo).items() if part == ALL_REDUCE}
    split(x, w)[0].block_until_ready()
    with tracing() as events:
        jax.block_until_ready(split(x, w))
    reduced = [hlo_op for *_, hlo_op in events() if hlo_op in collectives]
    assert len(reduced) == len(set(reduced)) >= 1  # each once: the first device's only
    assert scope_breakdown(events(), hlo, 1)["parts"][ALL_REDUCE] > 0

    nccl = [(0, 5000, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", ""),
            (5000, 7000, "ncclDevKernel_AllGather_RING_LL", "")]
    assert scope_breakdown(nccl, "", 1)["parts"] == {ALL_REDUCE: 5.0, COLLECTIVE: 2.0, "gaps": 0.0}
