"""`polar-jax bench generate`: end-to-end batched generation speed of a real model.

The whole generation (prefill and every decode step) is one jitted program, so a host timer
around it measures the device. The time per decode step is the difference between runs with
N and N/2 + 1 new tokens (the same compiled program: the count is a traced value) divided by
the steps between them, so prefill and transfers cancel out. EOS is disabled, so every
sequence decodes all N tokens; prompts are real text. With routers, the same prompts are
decoded sparsely at each fraction of groups, and the greedy tokens compared with dense.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from polar_jax import bench
from polar_jax.bench import timing
from polar_jax.dtypes import DTYPES, default_compute_dtype, parse_dtype
from polar_jax.validate import cli_list, cli_type, integer

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "demo" / "data" / "wikitext2_test.txt"


def _measure(decoder, prompts, new_tokens: int, repeats: int) -> dict:
    """Times of the whole program at N and N/2 + 1 new tokens (one compiled program)."""

    def median_seconds(count: int) -> float:
        return timing.median_seconds(lambda: decoder.generate_ids(prompts, count), repeats)

    start = time.perf_counter()
    tokens, _, _ = decoder.generate_ids(prompts, new_tokens)  # compiles, and warms up
    first_call = time.perf_counter() - start
    half = new_tokens // 2 + 1
    full, short = median_seconds(new_tokens), median_seconds(half)
    step = (full - short) / (new_tokens - half)
    batch = len(prompts)
    return {"tokens": tokens, "first_call_s": round(first_call, 3), "generate_s": round(full, 5),
            "tokens_per_second": round(batch * new_tokens / full, 1),
            "decode_step_ms": round(step * 1e3, 4),
            "decode_tokens_per_second": round(batch / step, 1)}


def run(model: str, routers: str | None, attn_topks: list[float], batch_size: int,
        new_tokens: int, prompt_len: int, dtype, repeats: int, text: Path) -> list[dict]:
    """Dense, then sparse at each fraction of groups (with `routers`), on the same prompts."""
    from polar_jax.decode import Decoder
    from polar_jax.errors import PolarJaxError
    from polar_jax.evaluate import read_text
    from polar_jax.loading import ModelDir
    from polar_jax.sparsity import SparsityPlan
    from routers.model import load_routers

    model_dir = ModelDir.open(model)
    config, tokenizer = model_dir.config, model_dir.tokenizer
    ids = np.asarray(tokenizer(read_text(text)[:2_000_000], add_special_tokens=False)["input_ids"])
    if len(ids) <= prompt_len:
        raise PolarJaxError(f"--prompt-len {prompt_len} needs a --text of more tokens; {text} has "
                            f"{len(ids)}")
    params = model_dir.load(dtype)
    starts = np.random.default_rng(0).integers(0, len(ids) - prompt_len, size=batch_size)
    prompts = [ids[s:s + prompt_len].tolist() for s in starts]
    base = {"model": model, "model_type": config.model_type, "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "batch_size": batch_size, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "repeats": repeats}
    dense = Decoder(config, params, tokenizer, eos_ids=[])
    rows = [dict(base, mode="dense", dtype=np.dtype(dense.dtype).name,
                 **_measure(dense, prompts, new_tokens, repeats))]
    if routers is not None:
        router_module, metadata = load_routers(routers, config)
        for fraction in attn_topks:
            plan = SparsityPlan.per_batch(config, metadata, fraction, (0,))
            sparse = Decoder(config, params, tokenizer, eos_ids=[], routers=router_module,
                             plan_for_batch=plan)
            row = dict(base, mode="sparse", attn_topk=fraction, dtype=rows[0]["dtype"],
                       mlp_neurons_per_layer=list(plan(_bucket(batch_size)).mlp_neurons),
                       **_measure(sparse, prompts, new_tokens, repeats))
            same = [a == b for a, b in zip(row["tokens"], rows[0]["tokens"])]
            row["sequences_equal_to_dense"] = f"{sum(same)}/{len(same)}"
            row["speedup_vs_dense"] = round(rows[0]["decode_step_ms"] / row["decode_step_ms"], 3)
            rows.append(row)
    for row in rows:
        del row["tokens"]
    return rows


def _bucket(batch: int) -> int:
    from polar_jax.decode import bucket_shape

    return bucket_shape(batch, 1, 1).batch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench.parser("generate", __doc__)
    parser.add_argument("--model", action="append", required=True, help="model directory (repeatable)")
    parser.add_argument("--routers", action="append",
                        help="routers directory of the --model at the same position (repeatable; "
                             "'-' for none): adds sparse rows")
    parser.add_argument("--attn-topk", type=cli_list(bench.FRACTION), default="0.5",
                        help="comma-separated fractions of KV groups a sparse step reads")
    parser.add_argument("--batch-size", type=bench.COUNT, default=64,
                        help="prompts decoded together")
    parser.add_argument("--new-tokens", type=cli_type(integer, int, low=3), default=128,
                        help="N, at least 3: a step's time is that of N less that of N/2 + 1 "
                             "tokens, over the steps between them")
    parser.add_argument("--prompt-len", type=bench.COUNT, default=64, help="tokens per prompt")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--repeats", type=bench.COUNT, default=5,
                        help="timed runs of each length; the median is reported")
    parser.add_argument("--text", type=Path, default=None,
                        help="where prompts come from (default: the repository's "
                             "demo/data/wikitext2_test.txt)")
    parser.add_argument("--json", type=bench.OUTPUT_FILE, help="write the results here")
    args = parser.parse_args(argv)
    if args.routers and len(args.routers) != len(args.model):
        parser.error("give one --routers (or '-') per --model")
    return args


def report(rows: list[dict]) -> None:
    """The rows as a table on stdout."""
    print(f"{'model':<14} {'mode':<13} {'dtype':<9} {'batch':>5} {'new':>4} {'tok/s':>10} "
          f"{'step ms':>8} {'decode tok/s':>12} {'vs dense':>8} {'same tokens':>11} {'1st call s':>10}")
    for r in rows:
        mode = r["mode"] if r["mode"] == "dense" else f"sparse {r['attn_topk']:g}"
        print(f"{Path(r['model']).name:<14} {mode:<13} {r['dtype']:<9} {r['batch_size']:>5} "
              f"{r['new_tokens']:>4} {r['tokens_per_second']:>10.1f} {r['decode_step_ms']:>8.3f} "
              f"{r['decode_tokens_per_second']:>12.1f} {r.get('speedup_vs_dense', 1.0):>8.2f} "
              f"{r.get('sequences_equal_to_dense', '-'):>11} {r['first_call_s']:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = parse_dtype(args.dtype) if args.dtype else default_compute_dtype()
    routers = [None if r == "-" else r for r in args.routers or ["-"] * len(args.model)]
    rows = []
    for model, router in zip(args.model, routers):
        rows += run(model, router, args.attn_topk, args.batch_size, args.new_tokens,
                    args.prompt_len, dtype, args.repeats, args.text or DEFAULT_TEXT)
    report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0
