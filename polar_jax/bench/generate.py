"""`python -m polar_jax.bench generate`: end-to-end batched generation speed of a real model.

The whole generation (prefill and every decode step) is one jitted program, so a host timer
around it measures the device. The time per decode step is the difference between runs with
N and N/2 + 1 new tokens (the same compiled program: the count is a traced value) divided by
the steps between them, so prefill and transfers cancel out. EOS is disabled, so every
sequence decodes all N tokens; prompts are real text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "demo" / "data" / "wikitext2_test.txt"


def _median_seconds(decoder, prompts, new_tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decoder.generate_ids(prompts, new_tokens)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(model: str, batch_size: int, new_tokens: int, prompt_len: int, dtype, repeats: int,
        text: Path) -> dict:
    from polar_jax.decode import Decoder
    from polar_jax.loading import load_model, load_tokenizer

    config, params = load_model(model, dtype)
    tokenizer = load_tokenizer(model)
    decoder = Decoder(config, params, tokenizer, eos_ids=[])
    ids = np.asarray(tokenizer(text.read_text()[:2_000_000], add_special_tokens=False)["input_ids"])
    starts = np.random.default_rng(0).integers(0, len(ids) - prompt_len, size=batch_size)
    prompts = [ids[s:s + prompt_len].tolist() for s in starts]
    half = new_tokens // 2 + 1
    start = time.perf_counter()
    decoder.generate_ids(prompts, new_tokens)  # compiles, and warms up
    first_call = time.perf_counter() - start
    full = _median_seconds(decoder, prompts, new_tokens, repeats)
    short = _median_seconds(decoder, prompts, half, repeats)
    step = (full - short) / (new_tokens - half)
    return {
        "model": model, "model_type": config.model_type, "device": jax.devices()[0].device_kind,
        "jax": jax.__version__, "dtype": np.dtype(decoder.dtype).name, "batch_size": batch_size,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "first_call_s": round(first_call, 3), "generate_s": round(full, 5),
        "tokens_per_second": round(batch_size * new_tokens / full, 1),
        "decode_step_ms": round(step * 1e3, 4),
        "decode_tokens_per_second": round(batch_size / step, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polar_jax.bench generate", description=__doc__)
    parser.add_argument("--model", action="append", required=True, help="model directory (repeatable)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="where prompts come from")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    from polar_jax.dtypes import default_compute_dtype, parse_dtype

    dtype = parse_dtype(args.dtype) if args.dtype else default_compute_dtype()
    rows = [run(m, args.batch_size, args.new_tokens, args.prompt_len, dtype, args.repeats, args.text)
            for m in args.model]
    print(f"{'model':<28} {'dtype':<9} {'batch':>5} {'new':>4} {'tok/s':>10} {'step ms':>8} "
          f"{'decode tok/s':>12} {'1st call s':>10}")
    for r in rows:
        print(f"{Path(r['model']).name:<28} {r['dtype']:<9} {r['batch_size']:>5} {r['new_tokens']:>4} "
              f"{r['tokens_per_second']:>10.1f} {r['decode_step_ms']:>8.3f} "
              f"{r['decode_tokens_per_second']:>12.1f} {r['first_call_s']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0
