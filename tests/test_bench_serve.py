"""`polar-jax bench serve` on the tiny-opt fixture: every request runs to its exact output
length, nothing compiles while serving, the engine's greedy tokens equal static batching's
(`Decoder.generate`), and the numbers agree with each other; bad arguments are refused in one
line."""

from __future__ import annotations

import json

import pytest

from conftest import fixture_path, run_cli

ARGS = ["--requests", "6", "--rate", "50", "--prompt-lens", "8,24", "--output-lens", "4,12",
        "--max-slots", "4", "--max-len", "128", "--modes", "dense"]


def test_serve_dense(tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc, stdout, stderr = run_cli(capsys, ["bench", "serve", "--model",
                                          fixture_path("fixtures", "tiny-opt"), *ARGS,
                                          "--json", out])
    assert rc == 0, stderr
    result = json.loads(out.read_text())
    assert result["meta"]["requests"] == 6 and result["meta"]["max_slots"] == 4
    (row,) = result["rows"]
    requests = row["per_request"]
    assert row["mode"] == "dense" and len(requests) == 6
    for r in requests:
        assert 8 <= r["prompt_len"] <= 24 and 4 <= r["output_len"] <= 12
        assert (r["generated"], r["reason"]) == (r["output_len"], "length")
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0
    assert [r["arrival_s"] for r in requests] == sorted(r["arrival_s"] for r in requests)
    assert requests[0]["arrival_s"] == 0
    outputs = sum(r["output_len"] for r in requests)
    assert row["completed"] == 6 and row["output_tokens"] == outputs
    assert row["compiles_after_warmup"] == 0
    # Prefill gives each request its first token, the decode steps the rest.
    assert row["decode_tokens"] == outputs - 6
    assert max(r["output_len"] for r in requests) - 1 <= row["decode_steps"] <= outputs - 6
    assert 1 <= row["decode_batch_mean"] <= 4 and 0 < row["mean_active_slots"] <= 4
    assert row["tokens_per_s"] == pytest.approx(outputs / row["wall_s"], rel=0.01)
    for name in ("ttft", "tpot"):
        p50, p90, p99 = (row[f"{name}_p{p}_ms"] for p in (50, 90, 99))
        values = sorted(r[f"{name}_ms"] for r in requests)
        assert values[0] <= p50 <= p90 <= p99 <= values[-1]
    assert row["same_tokens_as_static"] == 6  # greedy float32: the engine decodes as generate
    assert row["static_tokens_per_s"] == pytest.approx(outputs / row["static_s"], rel=0.01)
    table = stdout.splitlines()
    assert any(line.split()[:2] == ["dense", "6/6"] for line in table), stdout


@pytest.mark.parametrize("bad, name", [
    (["--rate", "0"], "--rate"),
    (["--prompt-lens", "24,8"], "--prompt-lens"),
    (["--output-lens", "4"], "--output-lens"),
    (["--modes", "dense,fast"], "--modes"),
    (["--max-len", "30"], "--max-len"),  # shorter than 24 + 12
    (["--max-slots", "1024"], "--max-slots"),
])
def test_bad_argument_is_refused_in_one_line(bad, name, tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc, stdout, stderr = run_cli(capsys, ["bench", "serve", "--model",
                                          fixture_path("fixtures", "tiny-opt"), *ARGS, *bad,
                                          "--json", out])
    assert rc == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("polar-jax: error: argument " + name)
    assert not out.exists()
