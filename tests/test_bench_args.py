"""`polar-jax bench` arguments: every bad value of every subcommand is refused by argparse in
one line (exit 2) before anything runs; help pages say `polar-jax bench ...` and show defaults;
bad input found after parsing (a missing or too short --text) is one `polar-jax: error:` line."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from conftest import DEMO
from polar_jax import bench
from polar_jax.cli import main as cli_main
from polar_jax.validate import cli_list

RNG = np.random.default_rng()
NEGATIVE = str(-int(RNG.integers(1, 1000)))  # fresh each run
ABOVE_ONE = f"{1 + RNG.uniform(1e-3, 5):.3f}"

# (subcommand, the arguments it always gets) that parse, so each case below adds one bad one.
BASE = {"decode": ["--arch", "tiny", "--peer", "off"],
        "generate": ["--model", str(DEMO / "tiny-opt")],
        "kernels": ["--quick"],
        "compile": ["--quick"],
        "prefill": ["--arch", "tiny"]}
BAD = [
    ("decode", ["--steps", "0"]), ("decode", ["--steps", NEGATIVE]), ("decode", ["--steps", "x"]),
    ("decode", ["--steps", "1.5"]), ("decode", ["--repeats", "0"]),
    ("decode", ["--batch-sizes", ","]), ("decode", ["--batch-sizes", ""]),
    ("decode", ["--batch-sizes", "1,,4"]), ("decode", ["--batch-sizes", f"1,{NEGATIVE}"]),
    ("decode", ["--batch-sizes", "two"]), ("decode", ["--context-lens", "0"]),
    ("decode", ["--context-lens", ""]), ("decode", ["--attn-topk", "0"]),
    ("decode", ["--attn-topk", f"0.5,{ABOVE_ONE}"]), ("decode", ["--attn-topk", "nan"]),
    ("decode", ["--attn-topk", ","]), ("decode", ["--mlp-density", "0"]),
    ("decode", ["--mlp-density", ABOVE_ONE]), ("decode", ["--mlp-density", "inf"]),
    ("prefill", ["--rows", "0"]), ("prefill", ["--offset", NEGATIVE]),
    ("prefill", ["--offset", "4097", "--chunk", "512"]),  # past --max-len 4608
    ("prefill", ["--page-size", "0"]), ("prefill", ["--arch", "nope"]),
    ("decode", ["--layers", "0"]), ("decode", ["--layers", "3"]),  # tiny has 2 layers
    ("decode", ["--dtype", "int8"]), ("decode", ["--tp", "0"]), ("decode", ["--dp", "x"]),
    ("decode", ["--dp", "2", "--batch-sizes", "4,3"]),  # batches split evenly over --dp
    ("decode", ["--collectives"]),  # of a step over one device
    ("decode", ["--plot", "collectives.png", "--tp", "2", "--collectives"]),  # nothing timed
    ("generate", ["--batch-size", "0"]), ("generate", ["--new-tokens", "2"]),
    ("generate", ["--new-tokens", NEGATIVE]), ("generate", ["--prompt-len", "0"]),
    ("generate", ["--repeats", "0"]), ("generate", ["--attn-topk", "0"]),
    ("generate", ["--attn-topk", ""]), ("generate", ["--attn-topk", ABOVE_ONE]),
    ("generate", ["--routers", "a", "--routers", "b"]),  # two --routers for one --model
    ("kernels", ["--reps", "0"]), ("kernels", ["--reps", "x"]), ("kernels", ["--target-ms", "0"]),
    ("kernels", ["--target-ms", NEGATIVE]), ("kernels", ["--target-ms", "inf"]),
    ("kernels", ["--d", "0"]), ("kernels", ["--d"]), ("kernels", ["--attn-shapes"]),
    ("kernels", ["--attn-shapes", "1,8,3,4"]), ("kernels", ["--attn-shapes", "1,8,2"]),
    ("kernels", ["--attn-shapes", "0,8,2,4"]), ("kernels", ["--only", "everything"]),
    ("compile", ["--only", "topk"]), ("compile", ["--only"]), ("compile", ["--topk-chunk", "24"]),
    ("compile", ["--topk-chunk", "8"]), ("compile", ["--topk-chunk", "x"]),
]


def _case_id(sub: str, argv: list[str]) -> str:
    """The case's name, the fresh values named (so that every pytest-xdist worker collects the
    same ids)."""
    words = " ".join(argv).replace(NEGATIVE, "NEGATIVE").replace(ABOVE_ONE, "ABOVE_ONE")
    return f"{sub} {words}"


@pytest.mark.parametrize("sub, argv", BAD, ids=[_case_id(s, a) for s, a in BAD])
def test_bad_argument_is_refused_in_one_line(sub, argv, tmp_path, capsys):
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as info:
        bench.main([sub, *BASE[sub], "--json", str(out), *argv])
    assert info.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("polar-jax: error: "), captured.err
    assert errors[0].endswith(f"(see `polar-jax bench {sub} --help`)"), captured.err
    name = next(a for a in argv if a.startswith("--"))
    assert name in errors[0], errors[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("sub", sorted(BASE))
def test_subcommand_help(sub, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main([sub, "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith(f"usage: polar-jax bench {sub} ") and "(default: " in help_text
    assert "python -m" not in help_text


def test_bench_usage_help_and_unknown_subcommand(capsys):
    assert bench.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: polar-jax bench SUBCOMMAND") and err == ""
    assert all(name in out for name in BASE)
    assert bench.main([]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("usage: polar-jax bench SUBCOMMAND") and out == ""
    assert bench.main(["decoder", "--arch", "tiny"]) == 2
    out, err = capsys.readouterr()
    assert err == ("polar-jax bench: error: unknown subcommand 'decoder'; choose from kernels, "
                   "generate, decode, serve, prefill, compile\n") and out == ""


def test_cli_list_reads_what_it_was_given():
    count = bench.COUNT
    values = RNG.integers(1, 10_000, size=RNG.integers(1, 8)).tolist()
    text = ",".join(" " * int(RNG.integers(0, 2)) + str(v) for v in values)
    assert cli_list(count)(text) == values
    fractions = RNG.uniform(1e-6, 1, size=3).round(6).tolist()
    assert cli_list(bench.FRACTION)(",".join(map(str, fractions))) == fractions
    with pytest.raises(argparse.ArgumentTypeError, match=r"got 0 \(in the list '3,0'\)"):
        cli_list(count)("3,0")


@pytest.mark.parametrize("text, message", [
    ("missing.txt", "does not exist"),
    ("short.txt", "--prompt-len 64 needs a --text of more tokens"),
])
def test_generate_text_errors(text, message, tmp_path, capsys):
    """Bad input found after parsing: one `polar-jax: error:` line, before any weight loads."""
    (tmp_path / "short.txt").write_text("A text of a few words only.\n")
    assert cli_main(["bench", "generate", "--model", str(DEMO / "tiny-opt"), "--text",
                     str(tmp_path / text), "--new-tokens", "3", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("polar-jax: error: ") and message in err
    assert str(tmp_path / text) in err


def test_compile_times_smoke(tmp_path, capsys):
    """`bench compile --quick` on the CPU, one row in its own process (as on a GPU): its table
    line, and its JSON with the lowering and compilation times and the target marked."""
    out = tmp_path / "compile.json"
    assert bench.main(["compile", "--quick", "--only", "write_kv_token", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["isolated"] and result["env"]["backend"] == "cpu"
    (row,) = result["rows"]
    assert row["kernel"] == "write_kv_token" and "error" not in row, row
    assert 0 < row["lower_s"] and 0 < row["compile_s"] < row["target_s"] == 20
    assert abs(row["seconds"] - row["lower_s"] - row["compile_s"]) < 0.01
    assert row["met"] and (result["targets"], result["targets_met"]) == (1, 1)
    line = f"| write_kv_token | B 2, H 4, S 64, D 16, dtype bfloat16 | {row['seconds']:.2f} |"
    assert line in printed
    assert "Targets: 1/1 met" in printed


def test_prefill_smoke(tmp_path, capsys):
    """`bench prefill` on the CPU: one timed call of the engine's prefill program; tokens/s is
    rows x chunk over the call's median time."""
    out = tmp_path / "prefill.json"
    assert bench.main(["prefill", "--arch", "tiny", "--rows", "2", "--chunk", "8", "--offset",
                       "5", "--max-len", "32", "--page-size", "3", "--repeats", "1",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["rows"] == 2 and result["ms"] > 0
    assert result["tokens_per_s"] == pytest.approx(16 / result["ms"] * 1e3, rel=1e-2)
    assert "prompt tokens/s" in capsys.readouterr().out
