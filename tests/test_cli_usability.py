"""The command line's first hour: --version, help pages with defaults, `bench --help`, one-line
usage errors, options that do not apply refused, progress on stderr (also with --json, not with
--quiet), generate's plain output parseable when piped, train-routers' timings, and evaluation's
position and memory checks. The API's defaults are the CLI's.

The model is test_api_errors.py's tiny random Llama (64 positions).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re

import numpy as np
import pytest

import polar_jax
import polar_jax.evaluate as evaluate
import polar_jax.loading as loading
import polar_jax.memory as memory
from conftest import run_cli
from polar_jax.cli import build_parser
from test_api_errors import MAX_POSITIONS, random_text, tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("cli") / "llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(random_text(np.random.default_rng(), 600), encoding="utf-8")
    return path


def _assert_one_line_error(capsys, argv, *needles: str) -> str:
    rc, out, err = run_cli(capsys, argv)
    assert rc == 2, (rc, out, err)
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("polar-jax: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _no_loading(monkeypatch):
    monkeypatch.setattr(loading.ModelDir, "load", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(evaluate, "_nll_fn", lambda *a, **k: pytest.fail("compiled"))


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[name]


# ---------------------------------------------------------------------------------------------
# Version, help, bench.


def test_version(capsys):
    rc, out, err = run_cli(capsys, ["--version"])
    assert (rc, out, err) == (0, f"polar-jax {polar_jax.__version__}\n", "")


@pytest.mark.parametrize("command", [[], ["convert"], ["eval"], ["eval", "perplexity"],
                                     ["generate"], ["train-routers"], ["serve"]])
def test_every_help_page_shows_defaults(capsys, command):
    rc, out, err = run_cli(capsys, [*command, "--help"])
    assert rc == 0 and err == "" and out.startswith("usage: polar-jax")
    text = " ".join(out.split())
    parser = build_parser()
    for name in command:
        parser = _subparser(parser, name)
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{action.option_strings} has no help"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, action.option_strings
    if command in (["generate"], ["eval", "perplexity"]):  # defaults applied after the check
        assert "reads (default: 0.5, or" in text and "dense (default: 0, or" in text


def test_bench_help_is_bench_s(capsys):
    rc, out, _ = run_cli(capsys, ["bench", "--help"])
    assert rc == 0 and "kernels" in out and "decode" in out
    rc, out, _ = run_cli(capsys, ["bench", "generate", "--help"])
    assert rc == 0 and "usage:" in out and "--model" in out


def test_defaults_are_the_apis():
    from polar_jax.decode import generate
    from routers.pipeline import train_routers
    from routers.train import TrainSettings

    parser = build_parser()
    gen = vars(parser.parse_args(["generate", "--model", "m", "--prompt", "p"]))
    api = inspect.signature(generate).parameters
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "batch_size"):
        assert gen[name] == api[name].default, name
    ppl = vars(parser.parse_args(["eval", "perplexity", "--model", "m", "--text", "t"]))
    api = inspect.signature(evaluate.perplexity).parameters
    for name in ("seq_len", "max_tokens", "batch_size"):
        assert ppl[name] == api[name].default, name
    tr = vars(parser.parse_args(["train-routers", "--model", "m", "--text", "t", "--out", "o"]))
    expected = TrainSettings()
    assert (tr["attn_topk"], tr["mlp_rank"], tr["epochs"], tr["batch_size"], tr["lr"], tr["seed"]) == (
        expected.attn_topk, expected.mlp_rank, expected.epochs, expected.batch_size,
        expected.learning_rate, expected.seed)
    assert tr["seq_len"] == inspect.signature(train_routers).parameters["seq_len"].default


# ---------------------------------------------------------------------------------------------
# Refusals in one line.


@pytest.mark.parametrize("argv, needles", [
    ([], ("the following arguments are required: COMMAND", "polar-jax --help")),
    (["generate", "--prompt", "p"], ("required: --model", "polar-jax generate --help")),
    (["generate", "--model", "m", "--prompt", "p", "--top-p", "0"],
     ("argument --top-p: must be a finite number in (0, 1], got 0.0",)),
    (["generate", "--model", "m", "--prompt", "p", "--temperature", "-1"],
     ("argument --temperature: must be a finite number >= 0, got -1.0",)),
    (["generate", "--model", "m", "--prompt", "p", "--temperature", "nan"], ("--temperature",)),
    (["generate", "--model", "m", "--prompt", "p", "--max-new-tokens", "0"],
     ("argument --max-new-tokens: must be an integer in [1, ",)),
    (["generate", "--model", "m", "--prompt", "p", "--top-k", "1.5"],
     ("argument --top-k: cannot read '1.5'",)),
    (["generate", "--model", "m", "--prompt", "p", "--seed", "-1"], ("argument --seed", "-1")),
    (["generate", "--model", "m", "--prompt", "p", "--batch-size", "-4"],
     ("argument --batch-size: must be an integer >= 1, got -4",)),
    (["generate", "--model", "m", "--prompt", "p", "--dense-layers", "0,x"],
     ("argument --dense-layers: cannot read '0,x'",)),
    (["generate", "--model", "m", "--prompt", "p", "--attn-topk", "0"], ("argument --attn-topk",)),
    (["eval", "perplexity", "--model", "m", "--text", "t", "--seq-len", "1"],
     ("argument --seq-len: must be an integer >= 2, got 1",)),
    (["eval", "perplexity", "--model", "m", "--text", "t", "--max-tokens", "1"],
     ("argument --max-tokens: must be an integer >= 2, got 1",)),
    (["train-routers", "--model", "m", "--text", "t", "--out", "o", "--lr", "0"],
     ("argument --lr: must be a finite number > 0",)),
    (["train-routers", "--model", "m", "--text", "t", "--out", "o", "--epochs", "0"],
     ("argument --epochs",)),
    (["train-routers", "--model", "m", "--text", "t", "--out", "o", "--attn-probe", "0"],
     ("argument --attn-probe: must be an integer >= 1, got 0",)),
    (["serve", "--model", "m", "--max-n", "0"], ("argument --max-n: must be an integer >= 1, "
                                                 "got 0",)),
])
def test_usage_errors_are_one_line(capsys, argv, needles):
    _assert_one_line_error(capsys, argv, *needles)


@pytest.mark.parametrize("extra, needles", [
    (["--routers", "r"], ("--routers='r' applies only with --mode sparse or oracle",)),
    (["--attn-topk", "0.3"], ("--attn-topk=0.3 applies only with --mode sparse or oracle",)),
    (["--dense-layers", "1"], ("--dense-layers=(1,) applies only",)),
    (["--mlp-batch-size", "4"], ("--mlp-batch-size=4 applies only",)),
    (["--with-dense"], ("--with-dense applies only with --mode sparse or oracle",)),
    (["--with-dense", "--attn-topk", "0.3"], ("--attn-topk=0.3 and --with-dense apply only",)),
    (["--mode", "oracle", "--mlp-batch-size", "4"],
     ("--mlp-batch-size=4 applies only with --routers",)),
    (["--mode", "sparse"], ("--mode sparse needs --routers",)),
    (["--mode", "oracle", "--routers", "r", "--router-weights", "int8"],
     ("--router-weights='int8' applies only with --mode sparse",)),
])
def test_eval_options_that_do_not_apply(capsys, monkeypatch, model_dir, text_file, extra, needles):
    _no_loading(monkeypatch)
    _assert_one_line_error(capsys, ["eval", "perplexity", "--model", model_dir, "--text",
                                    text_file, *extra], *needles)


@pytest.mark.parametrize("extra, needles", [
    (["--attn-topk", "0.3"], ("--attn-topk=0.3 applies only with --routers",)),
    (["--dense-layers", "1,0"], ("--dense-layers=(1, 0) applies only with --routers",)),
    (["--router-weights", "int8"], ("--router-weights='int8' applies only with --routers",)),
])
def test_generate_options_that_do_not_apply(capsys, monkeypatch, model_dir, extra, needles):
    _no_loading(monkeypatch)
    _assert_one_line_error(capsys, ["generate", "--model", model_dir, "--prompt", "the", *extra],
                           *needles)


def test_eval_past_the_models_positions(capsys, monkeypatch, model_dir, text_file):
    monkeypatch.setattr(evaluate, "_nll_fn", lambda *a, **k: pytest.fail("compiled"))
    _assert_one_line_error(
        capsys, ["eval", "perplexity", "--model", model_dir, "--text", text_file, "--seq-len",
                 MAX_POSITIONS + 1],
        f"--seq-len {MAX_POSITIONS + 1} exceeds the model's {MAX_POSITIONS} positions")


def test_eval_memory_refusal(capsys, monkeypatch, model_dir, text_file):
    monkeypatch.setattr(evaluate, "_nll_fn", lambda *a, **k: pytest.fail("compiled"))
    free = iter([1 << 40])  # the weights fit (the first check, at loading); the buffers do not
    monkeypatch.setattr(memory, "available_bytes", lambda device: next(free, 1 << 10))
    _assert_one_line_error(
        capsys, ["eval", "perplexity", "--model", model_dir, "--text", text_file, "--seq-len",
                 "64", "--batch-size", "16"],
        "--seq-len 64 at a batch of", "attention scores", "0.00 GiB free",
        "lower --batch-size or --seq-len")


def test_weights_memory_refusal(capsys, monkeypatch, model_dir, text_file):
    """A device's share of the weights is checked before anything is read."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 10)
    _assert_one_line_error(
        capsys, ["eval", "perplexity", "--model", model_dir, "--text", text_file],
        "the weights of", "weights per device", "0.00 GiB free", "spread the model over more devices (--tp)")


# ---------------------------------------------------------------------------------------------
# Output and progress.


def _parse_plain(out: str) -> tuple[list[str], list[str], str]:
    """(prompts, completions, summary) from plain `generate` output: "=== " lines delimit."""
    blocks = re.split(r"^=== ", out, flags=re.M)[1:]
    prompts = [b.split("\n", 1)[1].removesuffix("\n") for b in blocks if b.startswith("prompt ")]
    completions = [b.split("\n", 1)[1].removesuffix("\n") for b in blocks
                   if b.startswith("completion ")]
    (summary,) = [b.strip() for b in blocks if b.startswith("summary: ")]
    return prompts, completions, summary


def test_generate_piped_output_and_progress(capsys, model_dir):
    rng = np.random.default_rng()
    prompts = [random_text(rng, n) for n in (3, 6)]
    base = ["generate", "--model", model_dir, "--max-new-tokens", "5"]
    for prompt in prompts:
        base += ["--prompt", prompt]
    rc, out, err = run_cli(capsys, [*base, "--json"])
    assert rc == 0 and "generating" in err and "compiling" in err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["prompt"] for line in lines[:-1]] == prompts and lines[-1]["mode"] == "dense"

    rc, out, err = run_cli(capsys, [*base, "--quiet"])
    assert rc == 0 and err == ""
    got_prompts, completions, summary = _parse_plain(out)
    assert got_prompts == prompts
    assert completions == [line["completion"] for line in lines[:-1]]
    assert summary.startswith(f"summary: dense, {lines[-1]['new_tokens']} new tokens at batch size 2")


def test_eval_progress_with_json_not_with_quiet(capsys, model_dir, text_file):
    argv = ["eval", "perplexity", "--model", model_dir, "--text", text_file, "--seq-len", "32",
            "--json"]
    rc, out, err = run_cli(capsys, argv)
    assert rc == 0 and "windows" in err
    rc, quiet_out, err = run_cli(capsys, [*argv, "--quiet"])
    assert rc == 0 and err == ""
    loud, quiet = json.loads(out), json.loads(quiet_out)
    assert loud["perplexity"] == quiet["perplexity"] and loud["windows"] == quiet["windows"] > 1


def test_train_routers_timings_and_sparse_generate_summary(capsys, model_dir, tmp_path):
    # 2,000 words and 3 epochs at 1e-3: some epoch beats the untrained routers' held-out loss in
    # 40 of 40 trials (600 words, 1 epoch at 1e-4 missed in 1 of 40 and failed CI once)
    text_file = tmp_path / "text.txt"
    text_file.write_text(random_text(np.random.default_rng(), 2000), encoding="utf-8")
    out_dir = tmp_path / "routers"
    rc, out, err = run_cli(capsys, ["train-routers", "--model", model_dir, "--text", text_file,
                                 "--out", out_dir, "--seq-len", "32", "--batch-size", "16",
                                 "--epochs", "3", "--lr", "1e-3", "--mlp-rank", "8"])
    assert rc == 0 and err, err  # progress bars on stderr
    assert re.search(r"time: collect \d+\.\d s, train \d+\.\d s, calibrate \d+\.\d s$", out, re.M), out
    rc, out, err = run_cli(capsys, ["generate", "--model", model_dir, "--prompt", "the man said",
                                 "--max-new-tokens", "5", "--routers", out_dir, "--attn-topk",
                                 "0.5", "--quiet"])
    assert rc == 0 and err == ""
    _, completions, summary = _parse_plain(out)
    assert len(completions) == 1
    assert summary.startswith("summary: sparse (attn-topk 0.5, dense layers 0), ")
