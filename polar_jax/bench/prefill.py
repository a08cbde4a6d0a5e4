"""`polar-jax bench prefill`: the serving engine's prefill program at a built-in shape, alone.

The engine (`polar_jax.serve.engine`, random weights of `--arch`) is built with a page pool
holding `--rows` sequences of `--max-len` positions; each timed call prefills one chunk of
`--chunk` prompt tokens for each of the `--rows` rows, at positions `--offset` onwards (so
attention reads `--offset + --chunk` cached positions per row, through the block table, its
pages scattered over the pool). A call of a large model takes tens of milliseconds, so each is
timed from the host with its results awaited (median of `--repeats`, after two warm-up calls);
`--breakdown` adds one profiled call's device time by the model's named scopes (cuDNN's and
cuBLAS's kernels, which carry no HLO scope, as `other` and `library_gemm`). Prompt tokens per
second = rows x chunk / time: what the program sustains when every row is full (the engine's
end-to-end rate, `bench serve`'s `prefill_tokens_per_s`, also pays for partly filled chunks
and the host between calls).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import jax
import numpy as np

from polar_jax import bench
from polar_jax.validate import cli_type, integer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from polar_jax.bench.decode import ARCHS
    from polar_jax.dtypes import DTYPES

    parser = bench.parser("prefill", __doc__)
    parser.add_argument("--arch", choices=sorted(ARCHS), required=True,
                        help="a built-in shape of `bench decode` (random weights)")
    parser.add_argument("--rows", type=bench.COUNT, default=4, help="sequences a call prefills")
    parser.add_argument("--chunk", type=bench.COUNT, default=512, help="tokens per row and call")
    parser.add_argument("--offset", type=cli_type(integer, int, low=0), default=2048,
                        help="the chunk's first position (tokens already cached)")
    parser.add_argument("--max-len", type=bench.COUNT, default=4608,
                        help="positions per sequence (the pool holds --rows of them)")
    parser.add_argument("--page-size", type=bench.COUNT, default=16, help="tokens per KV page")
    parser.add_argument("--layers", type=bench.COUNT, default=None,
                        help="the architecture's first N layers only (default: all)")
    parser.add_argument("--repeats", type=bench.COUNT, default=5, help="timed calls (median)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--breakdown", action="store_true",
                        help="device time of one call by scope, from a profiler trace")
    parser.add_argument("--json", type=bench.OUTPUT_FILE, help="write the result here")
    args = parser.parse_args(argv)
    if args.offset + args.chunk > args.max_len:
        parser.error(f"argument --offset: the chunk ends at {args.offset + args.chunk}, past "
                     f"--max-len {args.max_len}")
    return args


def run(args: argparse.Namespace, log=print) -> dict:
    from flax import nnx

    from models import config_from_hf
    from polar_jax.bench.decode import arch_hf_config, random_state
    from polar_jax.decode import Decoder
    from polar_jax.dtypes import parse_dtype
    from polar_jax.serve.engine import Engine
    from polar_jax.serve.kv_pages import pages_for
    from polar_jax.serve.scheduler import PrefillChunk, Sequence, SlotEdit

    config = config_from_hf(arch_hf_config(args.arch, args.max_len, args.layers))
    model = nnx.merge(*random_state(config, parse_dtype(args.dtype)))
    per_seq = pages_for(args.max_len, args.page_size)
    engine = Engine(Decoder(config, model, eos_ids=()), max_slots=args.rows,
                    max_len=args.max_len, prefill_chunk=args.chunk, prefill_rows=args.rows,
                    page_size=args.page_size, kv_pages=args.rows * per_seq)
    rows, chunk, runner = args.rows, args.chunk, engine.runner
    rng = np.random.default_rng(0)
    table = rng.permutation(rows * per_seq).reshape(rows, per_seq)
    # Each row a sequence in its slot, its pages scattered over the pool, its chunk at --offset.
    sequences = [Sequence(tuple(rng.integers(0, config.vocab_size, args.offset + chunk).tolist()),
                          1, sampling=(0.0, 0, 1.0, 0), slot=i, pages=table[i].tolist(),
                          end=args.max_len - 1) for i in range(rows)]
    for sequence in sequences:
        sequence.prefill_ids = sequence.prompt
    runner.edit([SlotEdit(i, sequence, -1) for i, sequence in enumerate(sequences)])
    chunks = [PrefillChunk(sequence, args.offset, chunk, False) for sequence in sequences]

    def call():
        jax.block_until_ready(runner.prefill(chunks, echo=False))

    call(), call()
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    ms = float(np.median(seconds)) * 1e3
    result = dict(meta=dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                            date=str(datetime.date.today()), arch=args.arch, dtype=args.dtype,
                            layers=config.num_layers, rows=rows, chunk=chunk,
                            offset=args.offset, max_len=args.max_len,
                            page_size=args.page_size, repeats=args.repeats),
                  ms=round(ms, 3), tokens_per_s=round(rows * chunk / ms * 1e3, 1))
    log(f"{args.arch} prefill, {rows} x {chunk} tokens at positions {args.offset}+ "
        f"({result['meta']['device']}): {ms:.2f} ms a call, {result['tokens_per_s']:.0f} "
        f"prompt tokens/s")
    if args.breakdown:
        from polar_jax.bench.trace import scope_breakdown, tracing

        hlo = engine.prefill_program.lower(engine.decoder.state, engine.pages, *inputs,
                                           echo=False).compile().as_text()
        with tracing() as events:
            call()
        parts = scope_breakdown(events(), hlo, 1)
        result["breakdown_us"] = parts
        log("  us a call: span " + str(parts["span"]) + ": " + ", ".join(
            f"{k} {v}" for k, v in parts["parts"].items()))
        for kern in parts["top_kernels"][:8]:
            log(f"      {kern['us']:>9.1f} us  {kern['calls']:>5} x  {kern['scope']:<12} "
                f"{kern['kernel']}")
    engine.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args, lambda line: print(line, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
