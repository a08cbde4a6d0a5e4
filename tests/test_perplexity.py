"""Perplexity protocol and the fixture checkpoints' reference values (HF float32 on CPU)."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import fixture_path, run_optimized_cli
from polar_jax.cli import main
from polar_jax.windows import make_windows

# Reference perplexities from ../shared/fixtures/README.md: HF transformers, float32, CPU.
REFERENCE = {"tiny-llama": 59.474, "tiny-opt": 61.074}
SCORED_TOKENS = 65408


def test_windows_keep_a_last_window_of_at_least_two_tokens():
    ids = np.arange(1, 13, dtype=np.int32)
    tokens, mask = make_windows(ids[:11], 5)  # 5 + 5 + 1: the lone last token is dropped
    assert tokens.shape == (2, 5) and mask.sum() == 10
    tokens, mask = make_windows(ids, 5)  # 5 + 5 + 2: kept, right-padded
    assert tokens.shape == (3, 5)
    np.testing.assert_array_equal(mask[2], [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(tokens[2, :2], ids[10:12])
    np.testing.assert_array_equal(tokens[:2].ravel(), ids[:10])


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_fixture_perplexity_matches_hf(name, tmp_path):
    """Acceptance: convert, then `eval perplexity --max-tokens 65536` within 0.05% of HF."""
    src = fixture_path("fixtures", name)
    text = fixture_path("data", "wikitext2_test.txt")
    dst = tmp_path / name
    assert main(["convert", str(src), str(dst)]) == 0
    result = run_optimized_cli(["eval", "perplexity", "--model", dst, "--text", text,
                                "--max-tokens", "65536", "--dtype", "float32"])
    assert result["tokens"] == SCORED_TOKENS
    assert result["perplexity"] == pytest.approx(REFERENCE[name], rel=5e-4)
