"""`polar-jax bench serve`: continuous batching under load, dense and with Polar Sparsity,
against static batching of the same requests.

The model is a real checkpoint (`--model M [--routers R]`, trained routers or random ones) or
a built-in architecture of `bench decode` (`--arch`, random weights and routers, prompts cut
with `--tokenizer`'s vocabulary). `--requests` prompts are cut from `--text` at random word
starts, their lengths drawn uniformly from `--prompt-lens A,B`, each with an output length
drawn uniformly from `--output-lens A,B`; the engine has no EOS, so every request runs to its
output length. An asyncio driver submits them to the serving engine
(`polar_jax.serve.engine`, no HTTP) at Poisson arrivals of `--rate` requests per second and
records when each token arrives.

`--shared-prefix N` starts every prompt with the same N tokens (a system prompt; the engine's
prefix cache computes them once, `--no-prefix-cache` every time).

Per mode: output tokens per second over the wall time (first arrival to last token), the
mean active slots (requests between their first and last token, averaged over the wall
time), time to first token (from the request's scheduled arrival) and time per output token
after the first, at p50/p90/p99; the engine's mean decode step (iterations with a decode step
alone, from one iteration's results to the next's: the device's time per step while the host
keeps up; of it, the host's wait for the results: near 0, the host is the bottleneck) at its
mean batch and context, with the host-to-device transfers those steps made and the steps per batch
bucket; the share of wall time in iterations with prefill, the prompt tokens found in the
prefix cache; the XLA compilations while serving (0: the engine compiled every program
before). Then the same prompts decoded by static
batching, all at once (`Decoder.generate`, to the longest output length, then a timed second
run): tokens/s counts the requested output tokens only, and how many requests' tokens equal
the engine's (all, greedy and dense, up to rounding; sparse picks MLP neurons per batch, so
its tokens depend on which requests share a step).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import time
from pathlib import Path

import jax
import numpy as np

from polar_jax import bench, settings
from polar_jax.bench.generate import DEFAULT_TEXT
from polar_jax.errors import PolarJaxError
from polar_jax.validate import cli_list, cli_type, integer, number

MODES = ("dense", "sparse", "pages")
CHARS_PER_TOKEN = 8  # characters cut per prompt token (English BPE averages about 4)
_ROOT = Path(__file__).resolve().parents[2]
# The tiny-opt fixture: beside the checkout, else its copy bundled in demo/.
DEFAULT_TOKENIZER = next((p for p in (_ROOT.parent / "shared" / "fixtures" / "tiny-opt",
                                      _ROOT / "demo" / "tiny-opt") if p.is_dir()),
                         _ROOT / "demo" / "tiny-opt")


@dataclasses.dataclass(frozen=True)
class Load:
    """One request of the run: its prompt ids, output length, arrival (seconds after the
    first)."""

    prompt: tuple[int, ...]
    output_len: int
    arrival: float


@dataclasses.dataclass
class Served:
    """What came back for one request: token ids, their arrival times (seconds after the
    first request's), the `Done` reason."""

    tokens: list[int]
    times: list[float]
    reason: str


@contextlib.contextmanager
def counting_compiles():
    """A list that grows by one name per XLA backend compilation inside the block."""
    events: list[str] = []

    def listener(name, duration, **kwargs):
        if name.endswith("backend_compile_duration"):
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def cut_prompts(tokenizer, text: str, lengths, rng, vocab_size: int) -> list[tuple[int, ...]]:
    """One prompt per length: that many tokens of `text` from a random word start (ids taken
    modulo `vocab_size`, for random-weight architectures of a smaller vocabulary)."""
    spans = [CHARS_PER_TOKEN * int(n) for n in lengths]
    if len(text) <= max(spans):
        raise PolarJaxError(f"--text has {len(text)} characters; prompts of {max(lengths)} "
                            f"tokens need more than {max(spans)}")
    starts = [text.find(" ", int(rng.integers(0, len(text) - span))) + 1 for span in spans]
    pieces = [text[s:s + span] for s, span in zip(starts, spans)]
    tokens = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    prompts = []
    for start, n, ids in zip(starts, lengths, tokens):
        if len(ids) < n:
            raise PolarJaxError(f"--text at character {start} has fewer than {n} tokens in "
                                f"{CHARS_PER_TOKEN * n} characters")
        prompts.append(tuple(int(t) % vocab_size for t in ids[:n]))
    return prompts


def make_loads(tokenizer, text: str, vocab_size: int, count: int, rate: float, prompt_lens,
               output_lens, seed: int, shared_prefix: int = 0) -> list[Load]:
    """`count` requests: lengths uniform in the (low, high) ranges, Poisson arrivals at `rate`
    per second, the first at 0; each prompt after the same `shared_prefix` tokens (a system
    prompt) where given."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_lens[0], prompt_lens[1] + 1, count)
    outputs = rng.integers(output_lens[0], output_lens[1] + 1, count)
    gaps = rng.exponential(1 / rate, count)
    arrivals = np.cumsum(gaps) - gaps[0]
    prompts = cut_prompts(tokenizer, text, lengths, rng, vocab_size)
    system = cut_prompts(tokenizer, text, [shared_prefix], rng, vocab_size)[0] if shared_prefix else ()
    return [Load(system + p, int(n), float(t)) for p, n, t in zip(prompts, outputs, arrivals)]


async def drive(engine, loads: list[Load]) -> tuple[list[Served], float]:
    """Submits each load at its arrival and reads its stream; (what came back per load, wall
    seconds from the first arrival to the last event)."""
    from polar_jax.serve.engine import Request, Token

    t0 = time.perf_counter()

    async def one(load: Load) -> Served:
        await asyncio.sleep(max(0.0, t0 + load.arrival - time.perf_counter()))
        served = Served([], [], "")
        async for event in engine.submit(Request(load.prompt, load.output_len)):
            if isinstance(event, Token):
                served.tokens.append(event.id)
                served.times.append(time.perf_counter() - t0)
            else:
                served.reason = event.reason
        return served

    served = await asyncio.gather(*map(one, loads))
    return served, time.perf_counter() - t0


def _percentiles(name: str, values) -> dict:
    points = np.percentile(values, (50, 90, 99)) if len(values) else (None,) * 3
    return {f"{name}_p{p}_ms": None if v is None else round(float(v) * 1e3, 3)
            for p, v in zip((50, 90, 99), points)}


def serve(decoder, loads: list[Load], args, log) -> tuple[dict, list[list[int]], list[dict]]:
    """`loads` through an `Engine` of `decoder`: the serving half of the mode's row, each
    request's tokens, and a record per request."""
    from polar_jax.serve.engine import Engine

    engine = Engine(decoder, max_slots=args.max_slots, max_len=args.max_len,
                    prefill_chunk=min(args.prefill_chunk, args.max_len),
                    prefill_rows=args.prefill_rows, max_queue=len(loads),
                    page_size=args.page_size, kv_pages=args.kv_pages,
                    gpu_memory_fraction=args.gpu_memory_fraction,
                    max_batched_tokens=args.max_batched_tokens,
                    prefix_cache=not args.no_prefix_cache, batch_buckets=args.batch_buckets)
    log(f"KV cache: {engine.memory.describe()}")
    if decoder.sparse:
        log(f"sparse: attention {args.attn_topk:g} of KV groups; MLP neurons kept per layer at "
            f"{args.max_slots} slots: {list(decoder.plan_for_batch(args.max_slots).mlp_neurons)} "
            "(None: dense)")
    start = time.perf_counter()
    engine.start()
    warmup_s = time.perf_counter() - start
    log(f"{'sparse' if decoder.sparse else 'dense'}: engine compiled in {warmup_s:.1f} s; "
        f"serving {len(loads)} requests at {args.rate:g}/s")
    try:
        with counting_compiles() as compiles:
            served, wall = asyncio.run(drive(engine, loads))
    finally:
        engine.shutdown()
    per_request, ttfts, tpots = [], [], []
    for load, s in zip(loads, served):
        ttft = s.times[0] - load.arrival if s.times else None
        tpot = (s.times[-1] - s.times[0]) / (len(s.times) - 1) if len(s.times) > 1 else None
        ttfts += [ttft] if ttft is not None else []
        tpots += [tpot] if tpot is not None else []
        per_request.append(dict(prompt_len=len(load.prompt), output_len=load.output_len,
                                arrival_s=round(load.arrival, 4), generated=len(s.tokens),
                                reason=s.reason,
                                ttft_ms=None if ttft is None else round(ttft * 1e3, 3),
                                tpot_ms=None if tpot is None else round(tpot * 1e3, 3)))
    output_tokens = sum(len(s.tokens) for s in served)
    stats, prefill, prefix = engine.decode_stats, engine.prefill_stats, engine.scheduler.prefix
    steps, decoded = sum(engine.runner.decode_calls.values()), stats.decoded + prefill.decoded
    row = dict(completed=sum(r["generated"] == r["output_len"] and r["reason"] == "length"
                             for r in per_request),
               output_tokens=output_tokens, wall_s=round(wall, 3),
               tokens_per_s=round(output_tokens / wall, 1),
               mean_active_slots=round(sum(s.times[-1] - s.times[0] for s in served
                                           if s.times) / wall, 2),
               **_percentiles("ttft", ttfts), **_percentiles("tpot", tpots),
               decode_steps=steps, decode_tokens=decoded,
               decode_batch_mean=round(decoded / steps, 2) if steps else None,
               decode_context_mean=(round(stats.positions / stats.decoded, 1) if stats.decoded
                                    else None),
               decode_step_ms=round(stats.seconds / stats.timed * 1e3, 4) if stats.timed else None,
               decode_wait_ms=round(stats.waited / stats.timed * 1e3, 4) if stats.timed else None,
               decode_transfers=stats.transfers,
               decode_buckets={str(b): n for b, n in sorted(engine.runner.decode_calls.items())},
               prefill_iterations=prefill.steps, prefill_tokens=prefill.rows,
               prefill_s=round(prefill.seconds, 3),
               prefill_tokens_per_s=(round(prefill.timed_rows / prefill.seconds, 1)
                                     if prefill.seconds else None),
               prefill_share=round(prefill.seconds / wall, 3),
               prefix_cache_queries=prefix.queries, prefix_cache_hits=prefix.hits,
               kv_pages=engine.memory.num_pages, preemptions=engine.preemptions,
               warmup_s=round(warmup_s, 2), compiles_after_warmup=len(compiles))
    return row, [s.tokens for s in served], per_request


def static(decoder, loads: list[Load]) -> tuple[dict, list[list[int]] | None]:
    """Static batching of the same prompts, all in one batch to the longest output length:
    its seconds and tokens/s of the requested outputs, and its tokens (None where it does not
    fit: the reason is in the row)."""
    prompts = [list(load.prompt) for load in loads]
    longest = max(load.output_len for load in loads)
    try:
        decoder.generate_ids(prompts, longest)  # compiles, and warms up
        tokens, seconds, _ = decoder.generate_ids(prompts, longest)
    except PolarJaxError as err:
        return {"static_skipped": str(err)}, None
    requested = sum(load.output_len for load in loads)
    return {"static_s": round(seconds, 4),
            "static_tokens_per_s": round(requested / seconds, 1)}, tokens


def build_decoder(mode: str, args, config, model, tokenizer):
    """The `Decoder` of `mode`, without EOS; sparse: with the routers (trained with
    `--routers`, else random), MLP k from `--mlp-density` (every layer), else the routers'
    calibration, else a dense MLP; pages: sparse, and the page rule of `--page-topk` or
    `--page-budget` inside the kept groups."""
    from polar_jax.bench.decode import RANDOM_ROUTER_RANK
    from polar_jax.decode import Decoder
    from polar_jax.sparsity import SparsityPlan, mlp_density_metadata
    from routers.model import Routers, load_routers

    if mode == "dense":
        return Decoder(config, model, tokenizer, eos_ids=())
    if args.routers is None:
        routers, metadata = Routers.for_model(config, RANDOM_ROUTER_RANK, seed=1), None
    else:
        routers, metadata = load_routers(args.routers, config)
    if args.mlp_density is not None:
        metadata = mlp_density_metadata(config, args.mlp_density)
    plan = SparsityPlan.per_batch(config, metadata, args.attn_topk, (0,),
                                  page_rule=args.pages.rule() if mode == "pages" else None)
    return Decoder(config, model, tokenizer, eos_ids=(), routers=routers, plan_for_batch=plan,
                   page_size=args.page_size)


def _range(text: str) -> tuple[int, int]:
    """--prompt-lens / --output-lens: "A,B" with 1 <= A <= B."""
    values = cli_list(bench.COUNT)(text)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"must be A,B: two lengths with A <= B, got {text!r}")
    return tuple(values)


def _mode(text: str) -> str:
    if text not in MODES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(MODES)}, got {text!r}")
    return text


_range.__name__, _mode.__name__ = "range", "mode"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The checked arguments, --max-len defaulting to the longest prompt plus output."""
    from pallas_kernels.selection import CALIBRATION_BATCH_SIZES
    from polar_jax.bench.decode import ARCHS
    from polar_jax.dtypes import DTYPES

    parser = bench.parser("serve", __doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", choices=sorted(ARCHS),
                      help="a built-in shape of `bench decode`, random weights and routers")
    what.add_argument("--model", help="a real checkpoint: converted or Hugging Face directory")
    parser.add_argument("--routers", help="with --model: its trained routers (MLP k from their "
                                          "calibration); default random routers")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="with --arch: the model directory whose tokenizer cuts the prompts "
                             f"(default: {DEFAULT_TOKENIZER})")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="where prompts come from")
    parser.add_argument("--rate", type=cli_type(number, float, low=0, low_open=True),
                        required=True, help="mean requests per second (Poisson arrivals)")
    parser.add_argument("--requests", type=bench.COUNT, required=True, help="requests in all")
    parser.add_argument("--prompt-lens", type=_range, required=True,
                        help="A,B: prompt tokens, uniform in [A, B] (after --shared-prefix)")
    parser.add_argument("--shared-prefix", type=cli_type(integer, int, low=0), default=0,
                        help="tokens of one system prompt every request starts with")
    parser.add_argument("--output-lens", type=_range, required=True,
                        help="A,B: output tokens, uniform in [A, B]")
    parser.add_argument("--max-slots", type=cli_type(integer, int, low=1,
                                                     high=CALIBRATION_BATCH_SIZES[-1]),
                        default=64, help="the engine's sequences decoded together")
    parser.add_argument("--max-len", type=bench.COUNT, default=None,
                        help="the engine's positions per sequence (default: the longest prompt "
                             "plus the longest output)")
    parser.add_argument("--prefill-chunk", type=bench.COUNT, default=256,
                        help="prompt tokens prefilled per slot and iteration (at most --max-len)")
    parser.add_argument("--prefill-rows", type=bench.COUNT, default=4,
                        help="sequences prefilled together per iteration")
    parser.add_argument("--page-size", type=bench.COUNT, default=16, help="tokens per KV page")
    parser.add_argument("--kv-pages", type=bench.COUNT, default=None,
                        help="KV pages in the pool (default: as many as fit)")
    parser.add_argument("--max-batched-tokens", type=bench.COUNT, default=None,
                        help="tokens an engine iteration computes at most (default: "
                             "--prefill-rows x --prefill-chunk + --max-slots)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="compute every prompt in full")
    parser.add_argument("--batch-buckets", type=cli_list(bench.COUNT), default=None,
                        help="the decode step's batch sizes (default 1, 2, 4, ... --max-slots)")
    parser.add_argument("--gpu-memory-fraction", type=cli_type(number, float, low=0, high=1,
                                                               low_open=True), default=0.9,
                        help="share of the device the engine's pool is cut from (on a CPU, of "
                             "the free memory; on a GPU set XLA_PYTHON_CLIENT_MEM_FRACTION)")
    parser.add_argument("--attn-topk", type=bench.FRACTION, default=0.5,
                        help="sparse: the fraction of KV groups a decode step reads")
    parser.add_argument("--mlp-density", type=bench.FRACTION, default=None,
                        help="sparse: the fraction of MLP neurons kept (non-gated MLPs); "
                             "default: the routers' calibrated k, or a dense MLP with random "
                             "routers")
    parser.add_argument("--no-static", action="store_true",
                        help="skip the static-batching comparison")
    parser.add_argument("--page-topk", type=settings.cli_type("page_topk", float),
                        help="mode pages: the fraction of its pages each kept group reads")
    parser.add_argument("--page-budget", type=settings.cli_type("page_budget"),
                        help="mode pages: the tokens of pages each kept group reads")
    parser.add_argument("--page-min-context", type=settings.cli_type("page_min_context"),
                        help="mode pages: sequences shorter than this read every page")
    parser.add_argument("--modes", type=cli_list(_mode), default="dense,sparse",
                        help="comma-separated, in this order: dense, sparse (groups), pages "
                             "(groups and pages: --page-topk or --page-budget)")
    parser.add_argument("--seed", type=settings.cli_type("seed"), default=0,
                        help="of the prompts, lengths and arrivals")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--json", type=bench.OUTPUT_FILE, help="write the results here")
    args = parser.parse_args(argv)
    if args.routers is not None and args.model is None:
        parser.error("argument --routers: needs --model (--arch uses random routers)")
    if args.tokenizer is not None and args.model is not None:
        parser.error("argument --tokenizer: applies to --arch (--model uses its own)")
    longest = args.shared_prefix + args.prompt_lens[1] + args.output_lens[1]
    if args.max_len is None:
        args.max_len = longest
    elif args.max_len < longest:
        parser.error(f"argument --max-len: must hold the longest prompt plus the longest output "
                     f"({args.shared_prefix} + {args.prompt_lens[1]} + {args.output_lens[1]}), "
                     f"got {args.max_len}")
    args.modes = list(dict.fromkeys(args.modes))
    try:
        args.pages = settings.PageSettings(**settings.given(
            page_topk=args.page_topk, page_budget=args.page_budget,
            page_min_context=args.page_min_context))
    except PolarJaxError as err:
        parser.error(str(err))
    if ("pages" in args.modes) != args.pages.on:
        parser.error("mode pages and --page-topk or --page-budget go together")
    return args


def run(args: argparse.Namespace, log=print) -> dict:
    """{"meta": ..., "rows": [one per mode]}, as `--json` writes it."""
    from flax import nnx

    from models import config_from_hf
    from polar_jax.bench.decode import arch_hf_config, random_state
    from polar_jax.dtypes import default_compute_dtype, parse_dtype
    from polar_jax.evaluate import read_text
    from polar_jax.loading import ModelDir, load_tokenizer

    dtype = parse_dtype(args.dtype) if args.dtype else default_compute_dtype()
    text = read_text(args.text)
    if args.model is None:
        config = config_from_hf(arch_hf_config(args.arch, args.max_len))
        tokenizer = load_tokenizer(args.tokenizer or DEFAULT_TOKENIZER)
    else:
        model_dir = ModelDir.open(args.model)
        config, tokenizer = model_dir.config, model_dir.tokenizer
        if args.max_len > (positions := config.max_position_embeddings):
            raise PolarJaxError(f"--max-len {args.max_len} exceeds the {positions} positions of "
                                f"{args.model} (it defaults to the longest prompt plus output)")
    loads = make_loads(tokenizer, text, config.vocab_size, args.requests, args.rate,
                       args.prompt_lens, args.output_lens, args.seed, args.shared_prefix)
    model = (nnx.merge(*random_state(config, dtype)) if args.model is None
             else model_dir.load(dtype))
    # All made first, so that bad routers are refused before anything runs (the weights are
    # shared); each freed, with its static KV cache, before the next mode runs.
    decoders = {mode: build_decoder(mode, args, config, model, tokenizer) for mode in args.modes}
    rows = []
    for mode in args.modes:
        decoder = decoders.pop(mode)
        row, tokens, per_request = serve(decoder, loads, args, log)
        static_row, static_tokens = ({"static_skipped": "--no-static"}, None) if args.no_static \
            else static(decoder, loads)
        row = dict(mode=mode, **row, **static_row)
        if static_tokens is not None:
            row["serve_vs_static"] = round(row["tokens_per_s"] / row["static_tokens_per_s"], 3)
            row["same_tokens_as_static"] = sum(
                t == s[:load.output_len] for t, s, load in zip(tokens, static_tokens, loads))
        rows.append(dict(row, per_request=per_request))
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=str(datetime.date.today()), subject=args.arch or str(args.model),
                routers=args.routers, dtype=np.dtype(dtype).name, requests=args.requests,
                rate=args.rate, prompt_lens=list(args.prompt_lens),
                output_lens=list(args.output_lens), max_slots=args.max_slots,
                max_len=args.max_len, prefill_chunk=min(args.prefill_chunk, args.max_len),
                prefill_rows=args.prefill_rows, page_size=args.page_size,
                shared_prefix=args.shared_prefix, prefix_cache=not args.no_prefix_cache,
                max_batched_tokens=args.max_batched_tokens, batch_buckets=args.batch_buckets,
                attn_topk=args.attn_topk, mlp_density=args.mlp_density, seed=args.seed,
                text=str(args.text))
    return {"meta": meta, "rows": rows}


def _ms3(row: dict, name: str) -> str:
    return "/".join("-" if row[f"{name}_p{p}_ms"] is None else f"{row[f'{name}_p{p}_ms']:.1f}"
                    for p in (50, 90, 99))


def report(result: dict, json_path: Path | None, log=print) -> None:
    """The rows as a table; the result written to `json_path` where given."""
    meta = result["meta"]
    log(f"{meta['subject']} on {meta['device']}, {meta['dtype']}: {meta['requests']} requests at "
        f"{meta['rate']:g}/s, prompt lengths {meta['prompt_lens']}, output lengths "
        f"{meta['output_lens']}, {meta['max_slots']} slots")
    log(f"{'mode':<7} {'done':>7} {'tok/s':>9} {'slots':>6} {'TTFT ms p50/90/99':>22} "
        f"{'TPOT ms p50/90/99':>20} {'wall s':>7} {'step ms':>8} {'batch':>6} {'context':>7} "
        f"{'prefill':>7} {'hits':>7} {'static tok/s':>12} {'compiles':>8}")
    for r in result["rows"]:
        static_tps = f"{r['static_tokens_per_s']:.1f}" if "static_tokens_per_s" in r else "-"
        step = "-" if r["decode_step_ms"] is None else f"{r['decode_step_ms']:.3f}"
        batch = "-" if r["decode_batch_mean"] is None else f"{r['decode_batch_mean']:.1f}"
        context = "-" if r["decode_context_mean"] is None else f"{r['decode_context_mean']:.0f}"
        hits = r["prefix_cache_hits"] / max(1, r["prefix_cache_queries"])
        log(f"{r['mode']:<7} {r['completed']:>3}/{len(r['per_request']):<3} "
            f"{r['tokens_per_s']:>9.1f} {r['mean_active_slots']:>6.2f} {_ms3(r, 'ttft'):>22} "
            f"{_ms3(r, 'tpot'):>20} {r['wall_s']:>7.2f} {step:>8} {batch:>6} {context:>7} "
            f"{r['prefill_share']:>7.1%} {hits:>7.1%} {static_tps:>12} "
            f"{r['compiles_after_warmup']:>8}")
        if "static_skipped" in r:
            log(f"{r['mode']}: static batching skipped: {r['static_skipped']}")
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda line: print(line, flush=True)
    report(run(args, log), args.json, log)
    return 0
