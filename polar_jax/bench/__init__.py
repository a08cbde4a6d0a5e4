"""GPU benchmarks: `python -m polar_jax.bench SUBCOMMAND ...` (or `polar-jax bench ...`).

Subcommands:
  kernels   the Pallas kernels (selective MLP, group-sparse decode attention) against dense
            baselines, with the copy bandwidth measured in the same run.
  generate  end-to-end batched generation of a real model: tokens/s and time per decode step.
"""

from __future__ import annotations

import sys

_SUBCOMMANDS = {
    "kernels": ("polar_jax.bench.kernels", "the Pallas kernels against dense baselines"),
    "generate": ("polar_jax.bench.generate", "end-to-end batched generation of a real model"),
    "decode": ("polar_jax.bench.decode", "decode steps at real model shapes: dense, sparse, roofline"),
}


def _usage() -> str:
    lines = ["usage: python -m polar_jax.bench SUBCOMMAND [options]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in _SUBCOMMANDS.items()]
    lines += ["", "`SUBCOMMAND --help` lists a subcommand's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `argv` (default: `sys.argv[1:]`) to a benchmark subcommand; returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in _SUBCOMMANDS:
        print(f"unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(_SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)
