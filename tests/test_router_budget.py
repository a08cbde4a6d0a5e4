"""The adaptive attention budget end to end, on mixed corpora, under tensor parallelism:
`train-routers --attn-budget adaptive --tp 2` with two weighted texts and a low-rank router,
then the budget read back by decoding and by `eval perplexity --with-oracle`.

The model is a tiny random OPT (4 KV groups, 2 layers) with the demo tokenizer: what is
checked is the bookkeeping (the total, the rounding, the costs against the masked evaluation,
the proportions, the per-corpus recall), not the quality of the routers.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DEMO, run_cli
from models.sharding import make_mesh
from polar_jax.decode import Decoder
from polar_jax.cli import main
from polar_jax.loading import ModelDir
from polar_jax.sparsity import MaskedOps, SparsityPlan
from polar_jax.windows import stream_windows
from routers.budget import allocate
from routers.pipeline import mix_corpora, split_tokens

transformers = pytest.importorskip("transformers")

TEXTS = (DEMO / "data" / "wikitext2_valid.txt", DEMO / "data" / "wikitext2_test.txt")
SEQ_LEN = 32


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """(model dir, routers dir, the --json summary) of one adaptive training run."""
    root = tmp_path_factory.mktemp("budget")
    model_dir = root / "opt"
    hf = transformers.OPTConfig(vocab_size=4096, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128,
                                word_embed_proj_dim=32, pad_token_id=0, bos_token_id=0,
                                eos_token_id=0)
    transformers.OPTForCausalLM(hf).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(DEMO / "tiny-opt" / name, model_dir / name)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["train-routers", "--model", str(model_dir), "--text", str(TEXTS[0]),
                     "--text", str(TEXTS[1]), "--text-weights", "3,1", "--max-tokens", "2000",
                     "--attn-topk", "0.75", "--attn-budget", "adaptive", "--attn-rank", "8",
                     "--attn-activation", "silu", "--tp", "2", "--epochs", "1",
                     "--batch-size", "16", "--mlp-rank", "8", "--seq-len", str(SEQ_LEN),
                     "--lr", "1e-3", "--out", str(root / "routers"), "--quiet", "--json"]) == 0
    return model_dir, root / "routers", json.loads(buffer.getvalue().strip().splitlines()[-1])


def _calibration_ids(model_dir: Path) -> list[np.ndarray]:
    """Each corpus's calibration split, as the pipeline draws it."""
    tokenizer = ModelDir.open(model_dir).tokenizer
    corpora = {str(p): np.asarray(tokenizer(p.read_text(), add_special_tokens=False)["input_ids"],
                                  np.int32) for p in TEXTS}
    return [split_tokens(ids)[1] for ids in mix_corpora(corpora, [3.0, 1.0], 2000).values()]


def test_adaptive_budget_total_rounding_and_costs(budget_run):
    """The counts average exactly 0.75 of the 4 groups, are multiples of --tp, are the cheapest
    allocation of the stored costs, and each cost is the masked evaluation's (oracle groups in
    that layer alone, per shard) mean NLL increase on the calibration split."""
    model_dir, routers_dir, summary = budget_run
    counts = summary["attn_groups_per_layer"]
    assert sum(counts) == 0.75 * 4 * 2 and all(k in (2, 4) for k in counts)
    metadata = json.loads((routers_dir / "routers.json").read_text())
    costs = np.array([[np.inf if c is None else c for c in row]
                      for row in metadata["attn_budget_nll_increase"]])
    assert allocate(costs, 6, 2) == tuple(counts)
    model_dir_ = ModelDir.open(model_dir)
    config, model = model_dir_.config, model_dir_.load(jnp.float32)
    tokens, mask = stream_windows(_calibration_ids(model_dir), SEQ_LEN)

    def mean_nll(attn_groups) -> float:
        ops = MaskedOps(jnp.asarray(mask), "oracle", SparsityPlan(attn_groups, (None, None), 2), 4)
        total, count = model.nll(jnp.asarray(tokens), jnp.asarray(mask), ops)
        return float(total) / float(count)

    dense = mean_nll((None, None))
    for layer in range(2):
        keep = tuple(1 if i == layer else None for i in range(2))  # 1 of each shard's 2 groups
        assert costs[layer, 2] == pytest.approx(mean_nll(keep) - dense, abs=2e-5)
        assert costs[layer, 4] == 0 and np.isinf(costs[layer, [0, 1, 3]]).all()
    # Decoding over 2 devices follows the budget: 1 group of each shard's 2, or all.
    decoder = Decoder.load(model_dir, routers=routers_dir, mesh=make_mesh(2))
    assert decoder.plan_for_batch(1).attn_groups == tuple(None if k == 4 else 1 for k in counts)


def test_mixed_corpora_proportions_and_recall(budget_run):
    """3:1 of the 2000 tokens from the two texts; the recall pooled over the metric split is the
    token-weighted mean of the per-corpus recalls."""
    _, _, summary = budget_run
    assert list(summary["tokens_per_corpus"].values()) == [1500, 500]
    assert summary["tokens_train"] == 1200 + 400 and summary["tokens_heldout"] == 300 + 100
    recall = summary["attn_recall_per_corpus"]
    pooled = (150 * recall[str(TEXTS[0])] + 50 * recall[str(TEXTS[1])]) / 200
    assert summary["attn_recall_mean"] == pytest.approx(pooled, abs=1e-9)
    assert 0 < min(recall.values()) and max(recall.values()) <= 1


def test_eval_with_oracle_and_the_budget(budget_run, capsys):
    """`--with-oracle` prints dense, oracle and sparse, each equal to its own run over the same
    windows; the plan is the routers' budget; another --attn-topk is refused in one line."""
    model_dir, routers_dir, summary = budget_run
    base = ["eval", "perplexity", "--model", model_dir, "--text", TEXTS[1], "--max-tokens", 600,
            "--seq-len", SEQ_LEN, "--json"]
    runs = {}
    for mode, extra in (("sparse", ["--with-oracle"]), ("oracle", []), ("dense", [])):
        routers = [] if mode == "dense" else ["--routers", routers_dir]
        rc, out, err = run_cli(capsys, base + ["--mode", mode] + routers + extra)
        assert rc == 0, err
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    both = runs["sparse"]
    assert both["attn_groups_per_layer"] == summary["attn_groups_per_layer"]
    assert both["oracle_perplexity"] == runs["oracle"]["perplexity"]
    assert both["dense_perplexity"] == runs["dense"]["perplexity"]
    assert both["perplexity"] != both["dense_perplexity"]
    rc, _, err = run_cli(capsys, base + ["--mode", "sparse", "--routers", routers_dir,
                                         "--attn-topk", "0.5"])
    assert rc == 2 and err.count("\n") == 1
    assert "calibrated for --attn-topk 0.75, got 0.5" in err
    rc, _, err = run_cli(capsys, base + ["--mode", "oracle", "--routers", routers_dir,
                                         "--with-oracle"])
    assert rc == 2 and "--with-oracle applies only with --mode sparse" in err
