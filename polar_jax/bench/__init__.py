"""GPU benchmarks: `polar-jax bench SUBCOMMAND ...` (or `python -m polar_jax.bench ...`).

Subcommands:
  kernels   the Pallas kernels (selective MLP, group-sparse decode attention) against dense
            baselines, with the copy bandwidth measured in the same run.
  generate  end-to-end batched generation of a real model: tokens/s and time per decode step.
  decode    decode steps at real model shapes: dense, sparse and the memory roofline.
  serve     continuous batching under Poisson load (the serving engine), dense and sparse,
            against static batching of the same requests.
  prefill   the serving engine's prefill program (chunks of prompts into the paged cache)
            alone: prompt tokens per second, and where a call's time goes.
  compile   how long the Pallas kernels and the jitted decode-step program take to compile
            at the real decode shapes, against the targets.

Every subcommand's parser comes from `parser`, and its numeric arguments are checked by the
argparse types below (`polar_jax.validate`), so a bad value is refused before anything runs.
"""

from __future__ import annotations

import argparse
import sys

from polar_jax.files import output_file
from polar_jax.validate import ArgumentParser, cli_type, integer, number

_SUBCOMMANDS = {
    "kernels": ("polar_jax.bench.kernels", "the Pallas kernels against dense baselines"),
    "generate": ("polar_jax.bench.generate", "end-to-end batched generation of a real model"),
    "decode": ("polar_jax.bench.decode", "decode steps at real model shapes: dense, sparse, roofline"),
    "serve": ("polar_jax.bench.serve", "continuous batching under load against static batching"),
    "prefill": ("polar_jax.bench.prefill", "the serving engine's prefill program alone"),
    "compile": ("polar_jax.bench.compile_times", "compile times of the kernels and the decode program"),
}

COUNT = cli_type(integer, int, low=1)  # steps, repeats, batch sizes, lengths, layers, dimensions
FRACTION = cli_type(number, float, low=0, high=1, low_open=True)  # of KV groups, of MLP neurons
OUTPUT_FILE = cli_type(output_file, str)  # --json, --plot: checked before the run, not after it


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of `polar-jax bench NAME`."""
    return ArgumentParser(prog=f"polar-jax bench {name}", description=description)


def _usage() -> str:
    lines = ["usage: polar-jax bench SUBCOMMAND [options]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in _SUBCOMMANDS.items()]
    lines += ["", "`polar-jax bench SUBCOMMAND --help` lists a subcommand's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `argv` (default: `sys.argv[1:]`) to a benchmark subcommand; returns an exit code
    (a subcommand's bad argument exits 2 through argparse)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in _SUBCOMMANDS:
        print(f"polar-jax bench: error: unknown subcommand {name!r}; choose from "
              f"{', '.join(_SUBCOMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(_SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)
