"""The `polar-jax` command line.

Options are checked by the Python API's own checks (`polar_jax.settings`, `polar_jax.validate`)
and their defaults are the API's. An option that is given but does not apply is an error;
such options default to None here, so that "given" shows, and take their real default after.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from polar_jax import __version__, settings, validate
from polar_jax.dtypes import DTYPES
from polar_jax.errors import PolarJaxError
from polar_jax.settings import EvalSettings, GenerationSettings, PageSettings, SparsitySettings

_positive = validate.cli_type(validate.integer, int, low=1)


def _weights(text: str) -> tuple[float, ...]:
    """--text-weights: "3,1" -> (3.0, 1.0), each a positive number."""
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: give comma-separated positive "
                                         "numbers, e.g. 3,1") from None
    if not all(0 < w < float("inf") for w in weights):
        raise argparse.ArgumentTypeError(f"{text!r}: every weight must be a positive number")
    return weights


def _default(value) -> str:
    """ "(default: VALUE)" for the help of an option that defaults to None until checked."""
    if isinstance(value, tuple):
        value = ",".join(map(str, value)) or "none"
    return f"(default: {value})"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype and --quiet, as every command that runs a model takes them."""
    parser.add_argument("--model", required=True, help="converted or Hugging Face model directory")
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    _add_quiet(parser)


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars on stderr")


def _add_sparsity_args(parser: argparse.ArgumentParser, needs: str,
                       router_needs: str | None = None) -> None:
    """--attn-topk and --dense-layers (`needs`: when they apply), --router-weights
    (`router_needs`, default `needs`)."""
    parser.add_argument("--attn-topk", type=settings.cli_type("attn_topk", float),
                        help=f"{needs}: fraction of KV groups each token reads "
                             "(default: 0.5, or the routers' own where they carry a "
                             "calibrated per-layer budget)")
    parser.add_argument("--dense-layers", type=settings.cli_type("dense_layers", settings.parse_layers),
                        help=f"{needs}: comma-separated layers whose attention stays dense "
                             "(default: 0, or none with routers that carry a calibrated "
                             "per-layer budget)")
    parser.add_argument("--router-weights", choices=settings.ROUTER_WEIGHTS,
                        help=f"{router_needs or needs}: the MLP router's second projection "
                             "in the compute dtype, or int8 with a float32 scale per neuron "
                             "(half the bytes of bfloat16; non-gated MLPs) (default: int8 "
                             "where there is an MLP router, measured faster at the same "
                             "accuracy)")


def _add_page_args(parser: argparse.ArgumentParser, page_size: bool = True) -> None:
    """--page-topk / --page-budget, --page-min-context and (`page_size`) --page-size: page
    sparsity inside the kept KV groups."""
    one = parser.add_mutually_exclusive_group()
    one.add_argument("--page-topk", type=settings.cli_type("page_topk", float),
                     help="page sparsity: fraction of its sequence's KV pages each kept group "
                          "reads (top pages by Quest's bound from per-page key min/max; the "
                          "first and the current page always)")
    one.add_argument("--page-budget", type=settings.cli_type("page_budget"),
                     help="page sparsity: tokens of KV pages each kept group reads (instead of "
                          "--page-topk)")
    parser.add_argument("--page-min-context", type=settings.cli_type("page_min_context"),
                        help="with --page-topk or --page-budget: sequences shorter than this "
                             f"many tokens read every page (default "
                             f"{settings.DEFAULT_PAGE_MIN_CONTEXT})")
    if page_size:
        parser.add_argument("--page-size", type=settings.cli_type("page_size"),
                            help="with --page-topk or --page-budget: tokens per KV page "
                                 f"(default {settings.DEFAULT_PAGE_SIZE})")


def _pages(args) -> PageSettings:
    if args.page_topk is None and args.page_budget is None:
        _refuse(args, tuple(d for d in ("page_min_context", "page_size") if hasattr(args, d)),
                "with --page-topk or --page-budget")
    return PageSettings(**settings.given(page_topk=args.page_topk, page_budget=args.page_budget,
                                         page_min_context=args.page_min_context,
                                         page_size=getattr(args, "page_size", None)))


def _add_device_args(parser: argparse.ArgumentParser, data_only: bool = False) -> None:
    """--tp/--dp (the mesh) and the multi-process options, as every command that runs a model
    on several devices takes them."""
    group = parser.add_argument_group("devices (default: one)")
    if not data_only:
        group.add_argument("--tp", type=_positive, default=1,
                           help="tensor parallel: split the model over N devices (KV groups with "
                                "their query heads, MLP neurons, vocabulary)")
    group.add_argument("--dp", type=_positive, default=1,
                       help="data parallel: split the batch over N (groups of) devices")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="several processes: process 0's address, the same for every process "
                            "(or JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=_positive,
                       help="with --coordinator: how many processes (or JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=validate.cli_type(validate.integer, int, low=0),
                       help="with --coordinator: this process's index from 0 (or JAX_PROCESS_ID)")
    group.add_argument("--coordinator-timeout", type=validate.cli_type(
                           validate.number, float, low=0, low_open=True), default=300.0,
                       help="with --coordinator: seconds to wait for the coordinator (process 0) "
                            "and the others to join")


def _mesh(args):
    """The `data` x `model` mesh of --dp x --tp devices over every process (after joining the
    others, if several), or None for one device in one process. With several processes only
    process 0 prints on stdout; native output (the collectives' logs) goes to stderr."""
    import os

    import jax

    from polar_jax import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           args.coordinator_timeout)
    several = distributed.several_processes()
    if several:
        sys.stdout.flush()
        keep = jax.process_index() == 0
        sys.stdout = os.fdopen(os.dup(1), "w") if keep else open(os.devnull, "w")  # noqa: SIM115
        os.dup2(2, 1)
    tp = getattr(args, "tp", 1)
    if tp * args.dp == 1 and not several:
        return None
    from models.sharding import make_mesh

    return make_mesh(tp, args.dp)


def _sparsity(args, **extra) -> SparsitySettings:
    return SparsitySettings(**settings.given(attn_topk=args.attn_topk,
                                             dense_layers=args.dense_layers,
                                             router_weights=args.router_weights, **extra))


def _topk_text(attn_topk) -> str:
    """--attn-topk as given, for messages (None: the default)."""
    return "default (0.5, or the routers' calibrated budget)" if attn_topk is None else f"{attn_topk:g}"


def _dense_layers_text(dense_layers) -> str:
    """--dense-layers as given, for messages (None: the default)."""
    if dense_layers is None:
        return "default (0, or none with a calibrated budget)"
    return ",".join(map(str, dense_layers)) or "none"


def _refuse(args, dests: tuple[str, ...], needs: str) -> None:
    """Refuses those options among `dests` that were given although they apply only `needs`."""
    settings.refuse_unused({f"--{dest.replace('_', '-')}": getattr(args, dest) for dest in dests},
                           needs)


def _cmd_convert(args) -> int:
    from convert import convert_checkpoint

    start = time.perf_counter()
    dst = convert_checkpoint(args.src, args.dst, dtype=args.dtype, allow_pickle=args.allow_pickle,
                             force=args.force, progress=not args.quiet)
    print(f"converted {args.src} -> {dst} in {time.perf_counter() - start:.1f} s")
    return 0


def _check_eval_mode(args) -> PageSettings:
    """Refuses the options `--mode` (and page sparsity) do not take; the page settings."""
    pages = _pages(args)
    if args.mode == "dense":
        group_only = ("routers", "attn_topk", "mlp_batch_size")
        either = tuple(d for d in ("dense_layers", "with_dense") if hasattr(args, d))
        _refuse(args, group_only + (() if pages.on else either),
                "with --mode sparse or oracle" + ("" if pages.on else
                                                  " (or page sparsity: --dense-layers, --with-dense)"))
    elif args.mode == "sparse" and not args.routers:
        raise PolarJaxError("--mode sparse needs --routers DIR (trained by `polar-jax train-routers`)")
    return pages


def _eval_routers(args, config, dtype, sparsity: SparsitySettings):
    """(the routers of --routers unstacked for evaluation in `dtype`, their metadata, their MLP
    router's weights as `router_weights_for` resolves them), or three Nones; read and checked
    before the model loads."""
    from routers.model import load_routers

    if not args.routers:
        return None, None, None
    routers, metadata = load_routers(args.routers, config)
    router_weights = sparsity.router_weights_for(routers.has_mlp)
    return routers.unstack(dtype, router_weights == "int8"), metadata, router_weights


def _masked_ops(args, config, metadata, sparsity: SparsitySettings, router_weights: str | None,
                pages: PageSettings, shards: int = 1):
    """(make_ops for `evaluate`, or None for dense; the plan's numbers for the report); the
    plan per shard of a tensor-parallel split over `shards`."""
    from polar_jax.sparsity import MaskedOps, SparsityPlan, attn_topk_of

    if args.mode == "dense" and not pages.on:
        return None, {}
    mode = "sparse" if args.mode == "dense" else args.mode  # dense groups, sparse pages
    attn_topk = 1.0 if args.mode == "dense" else attn_topk_of(metadata, sparsity.attn_topk)
    plan = SparsityPlan.build(config, metadata, attn_topk, sparsity.dense_layers,
                              sparsity.mlp_batch_size, shards=shards, page_rule=pages.rule())
    report = dict(attn_topk=attn_topk, dense_layers=sparsity.dense_layers,
                  attn_groups_per_layer=[config.num_kv_heads if k is None else k * plan.shards
                                         for k in plan.attn_groups],
                  mlp_batch_size=sparsity.mlp_batch_size, router_weights=router_weights,
                  mlp_neurons_per_layer=list(plan.mlp_neurons))
    if pages.on:
        report.update(page_topk=pages.page_topk, page_budget=pages.page_budget,
                      page_min_context=pages.rule().min_context, page_size=pages.size)

    def make_ops(key_valid, routers, mode=mode):
        return MaskedOps(key_valid, mode, plan, config.num_kv_heads, routers, pages.size)

    return make_ops, report


def _mode_text(result) -> str:
    """The sparsity of an evaluation, for messages."""
    parts = [] if result["mode"] == "dense" else [f"{result['mode']}, {result['attn_topk']:g} "
                                                  f"of KV groups"]
    if result.get("page_topk") is not None:
        parts.append(f"{result['page_topk']:g} of pages")
    elif result.get("page_budget") is not None:
        parts.append(f"{result['page_budget']} tokens of pages")
    return f" ({', '.join(parts)})" if parts else ""


def _cmd_eval_perplexity(args) -> int:
    import functools

    import jax.numpy as jnp

    from polar_jax.evaluate import perplexity, read_text
    from polar_jax.loading import ModelDir

    pages = _check_eval_mode(args)
    if args.mode == "sparse" and not args.routers:
        raise PolarJaxError("--mode sparse needs --routers DIR (trained by `polar-jax train-routers`)")
    if not args.routers:
        _refuse(args, ("mlp_batch_size",), "with --routers (it picks their calibrated MLP k)")
    if args.mode != "sparse":
        _refuse(args, ("router_weights", "with_oracle"), "with --mode sparse (the routers' scores)")
    sparsity = _sparsity(args, mlp_batch_size=args.mlp_batch_size)
    text = read_text(args.text)
    mesh = _mesh(args)  # joins the other processes before anything starts JAX's backend
    dtype = settings.compute_dtype(args.dtype)
    start = time.perf_counter()
    model_dir = ModelDir.open(args.model)
    config, tokenizer = model_dir.config, model_dir.tokenizer
    routers, metadata, router_weights = _eval_routers(args, config, dtype, sparsity)
    model = model_dir.load(dtype, mesh)
    run = functools.partial(perplexity, model, config, tokenizer, text, seq_len=args.seq_len,
                            max_tokens=args.max_tokens, batch_size=args.batch_size,
                            progress=not args.quiet, mesh=mesh)
    make_ops, report = _masked_ops(args, config, metadata, sparsity, router_weights, pages,
                                   args.tp)
    if make_ops is None:
        result = run()
    else:
        result = run(make_ops=make_ops, routers=routers)
        result.update(report)
        if args.with_oracle:
            oracle = lambda key_valid, routers: make_ops(key_valid, routers, mode="oracle")
            result["oracle_perplexity"] = run(make_ops=oracle)["perplexity"]
        if args.with_dense or args.with_oracle:
            result["dense_perplexity"] = run()["perplexity"]
    result.update(mode=args.mode, model=args.model, dtype=jnp.dtype(dtype).name,
                  seq_len=args.seq_len, tp=args.tp, dp=args.dp,
                  seconds=round(time.perf_counter() - start, 3))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f}{_mode_text(result)} over {result['tokens']} tokens "
              f"({result['windows']} windows of {args.seq_len}, {result['dtype']}, "
              f"{result['seconds']:.1f} s)")
        if "oracle_perplexity" in result:
            dense, oracle, sparse = (result[key] for key in
                                     ("dense_perplexity", "oracle_perplexity", "perplexity"))
            print(f"dense {dense:.4f}  oracle {oracle:.4f} ({oracle / dense - 1:+.2%})  sparse "
                  f"{sparse:.4f} ({sparse / dense - 1:+.2%}; {sparse / oracle - 1:+.2%} against "
                  f"the oracle), on the same windows")
        elif "dense_perplexity" in result:
            print(f"dense perplexity {result['dense_perplexity']:.4f}")
    return 0


def _cmd_eval_retrieval(args) -> int:
    import jax.numpy as jnp

    from polar_jax.evaluate import read_text, retrieval
    from polar_jax.loading import ModelDir

    pages = _check_eval_mode(args)
    if not args.routers:
        _refuse(args, ("mlp_batch_size",), "with --routers (it picks their calibrated MLP k)")
    sparsity = _sparsity(args, mlp_batch_size=args.mlp_batch_size)
    text = read_text(args.text)
    dtype = settings.compute_dtype(args.dtype)
    start = time.perf_counter()
    model_dir = ModelDir.open(args.model)
    config, tokenizer = model_dir.config, model_dir.tokenizer
    config.check_seq_len(args.seq_len)
    routers, metadata, router_weights = _eval_routers(args, config, dtype, sparsity)
    make_ops, report = _masked_ops(args, config, metadata, sparsity, router_weights, pages)
    result = retrieval(model_dir.load(dtype), config, tokenizer, text, args.trials, args.seq_len,
                       args.batch_size, args.seed, make_ops, routers)
    result.update(report, mode=args.mode, model=args.model, dtype=jnp.dtype(dtype).name,
                  seconds=round(time.perf_counter() - start, 3))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"retrieval accuracy {result['accuracy']:.4f}{_mode_text(result)} over "
              f"{result['scored']} repeated tokens ({args.trials} windows of {args.seq_len}; "
              f"first occurrence, nothing to retrieve: {result['first_accuracy']:.4f}; "
              f"{result['seconds']:.1f} s)")
    return 0


def _read_prompts(args) -> list[str]:
    if args.prompts_file is None:
        return args.prompt
    from polar_jax.evaluate import read_text

    return [line for line in read_text(args.prompts_file).splitlines() if line.strip()]


def _cmd_generate(args) -> int:
    from polar_jax.decode import Decoder
    from polar_jax.sampling import SamplingParams

    pages = _pages(args)
    if not args.routers:
        _refuse(args, ("attn_topk", "router_weights") + (() if pages.on else ("dense_layers",)),
                "with --routers (sparse decoding)" + ("" if pages.on else
                                                      " (--dense-layers: or page sparsity)"))
    sparsity = _sparsity(args)
    prompts = _read_prompts(args)
    decoder = Decoder.load(args.model, args.dtype, routers=args.routers,
                           attn_topk=args.attn_topk, dense_layers=args.dense_layers,
                           mesh=_mesh(args), router_weights=args.router_weights,
                           page_topk=args.page_topk, page_budget=args.page_budget,
                           page_min_context=args.page_min_context, page_size=args.page_size)
    result = decoder.generate(prompts, args.max_new_tokens,
                              SamplingParams(args.temperature, args.top_k, args.top_p), args.seed,
                              args.batch_size, progress=not args.quiet)
    summary = {"mode": "sparse" if decoder.sparse else "dense",
               "tokens_per_second": round(result.tokens_per_second, 2),
               "batch_size": result.batch_size, "new_tokens": result.new_tokens,
               "seconds": round(result.seconds, 4), "compile_seconds": round(result.compile_seconds, 3),
               "tp": args.tp, "dp": args.dp}
    if decoder.sparse:  # the layers whose attention the plan keeps whole
        dense_layers = [i for i, k in enumerate(decoder.plan_for_batch(1).attn_groups) if k is None]
        summary.update(attn_topk=sparsity.attn_topk, dense_layers=dense_layers,
                       router_weights=decoder.router_weights)
    if decoder.page_sparse:
        rule = pages.rule()
        summary.update(page_topk=rule.topk, page_budget=rule.budget,
                       page_min_context=rule.min_context, page_size=decoder.page_size)
    if args.json:
        for c in result.completions:
            print(json.dumps({"prompt": c.prompt, "completion": c.text, "tokens": c.tokens}))
        print(json.dumps(summary))
        return 0
    # Plain text: "=== " header lines delimit each prompt and completion, so piped output parses.
    bold = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    count = len(result.completions)
    for i, c in enumerate(result.completions, 1):
        print(f"=== prompt {i} of {count}\n{c.prompt}")
        print(f"=== completion {i} of {count} ({len(c.tokens)} tokens)\n{bold[0]}{c.text}{bold[1]}")
    mode = summary["mode"]
    if decoder.sparse:
        mode += (f" (attn-topk {_topk_text(sparsity.attn_topk)}, dense layers "
                 f"{','.join(map(str, summary['dense_layers'])) or 'none'})")
    if decoder.page_sparse:
        kept = (f"{summary['page_topk']:g} of" if summary["page_topk"] is not None
                else f"{summary['page_budget']} tokens of")
        mode += (f", page-sparse ({kept} {summary['page_size']}-token pages from "
                 f"{summary['page_min_context']} tokens)")
    print(f"=== summary: {mode}, {summary['new_tokens']} new tokens at batch size "
          f"{summary['batch_size']}: {summary['tokens_per_second']:.1f} tokens/s "
          f"({summary['seconds']:.2f} s, plus {summary['compile_seconds']:.1f} s compiling)")
    return 0


SERVE_MODULES = ("fastapi", "starlette", "uvicorn", "prometheus_client")  # the [serve] extra
# The server's limits (`polar_jax.serve.protocol.Limits`, whose defaults these are: not imported
# here, so that --help stays fast): (name, type, default, help).
_positive_number = validate.cli_type(validate.number, float, low=0, low_open=True)
SERVE_LIMITS = {
    "max_body_mb": (_positive_number, 16.0, "request body size in MiB, at most (then 413)"),
    "max_prompt_chars": (_positive, 1_000_000, "characters of a request's prompts or messages, "
                                               "at most (then 413)"),
    "max_stops": (_positive, 16, "stop strings per request, at most (then 400)"),
    "max_stop_chars": (_positive, 1000, "characters per stop string, at most (then 400)"),
    "max_n": (_positive, 16, "choices per prompt (a request's n), at most (then 400)"),
    "max_json_depth": (validate.cli_type(validate.integer, int, low=2, high=500), 64,
                       "arrays and objects nested in a request body, at most (then 400)"),
    "head_timeout": (_positive_number, 10.0, "seconds a connection may take to send a request "
                                             "head (then 408 and closed)"),
    "body_timeout": (_positive_number, 60.0, "seconds a request may take to send its body "
                                             "(then 408)"),
    "max_connections": (_positive, 512, "connections open at once, at most (more are answered "
                                        "503 and closed)"),
}


def _cmd_serve(args) -> int:
    import os

    try:
        from polar_jax.serve import server, text
        from polar_jax.serve.protocol import Limits
    except ModuleNotFoundError as err:
        if err.name not in SERVE_MODULES:
            raise
        raise PolarJaxError(f"polar-jax serve needs {err.name}: install the serve extra: "
                            "pip install 'polar-jax[serve]'") from None
    from polar_jax.decode import Decoder

    if args.page_topk is None and args.page_budget is None:
        _refuse(args, ("page_min_context",), "with --page-topk or --page-budget")
    pages = PageSettings(**settings.given(page_topk=args.page_topk, page_budget=args.page_budget,
                                          page_min_context=args.page_min_context))
    if not args.routers:
        _refuse(args, ("attn_topk", "router_weights") + (() if pages.on else ("dense_layers",)),
                "with --routers (sparse decoding)")
    sparsity = _sparsity(args)
    mode = "dense"
    if args.routers:
        mode = (f"sparse: attn-topk {_topk_text(sparsity.attn_topk)}, dense layers "
                f"{_dense_layers_text(sparsity.dense_layers)}")
    if pages.on:
        mode += (", pages: " + (f"top {pages.page_topk:g}" if pages.page_budget is None
                                else f"{pages.page_budget} tokens")
                 + f" past {pages.rule().min_context} tokens")
    mesh = None
    if args.tp > 1:
        from models.sharding import make_mesh

        mesh = make_mesh(args.tp)
        mode += f", tp {args.tp}"
    # The key: the flag, else the environment's (an empty one is none), as vLLM's.
    api_key = args.api_key if args.api_key is not None else (
        os.environ.get("POLAR_JAX_API_KEY") or None)
    chat_template = None
    if args.chat_template is not None:  # checked before the model loads
        from polar_jax.loading import load_tokenizer

        chat_template = text.read_chat_template(args.chat_template, load_tokenizer(args.model))
    load = lambda: Decoder.load(args.model, args.dtype, routers=args.routers,
                                attn_topk=args.attn_topk, dense_layers=args.dense_layers,
                                mesh=mesh, router_weights=args.router_weights,
                                page_topk=args.page_topk, page_budget=args.page_budget,
                                page_min_context=args.page_min_context)
    # The pool is cut from what XLA's allocator may hold on a GPU: the fraction is its limit
    # (read when the backend starts, which is later: nothing has touched a device yet).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{args.gpu_memory_fraction:g}")
    server.serve(load, host=args.host, port=args.port,
                 model_name=args.served_model_name or os.path.basename(os.path.abspath(args.model)),
                 mode=mode, access_log=not args.quiet, progress=not args.quiet,
                 api_key=api_key, chat_template=chat_template,
                 limits=Limits(**{name: getattr(args, name) for name in SERVE_LIMITS}),
                 engine_options=dict(max_slots=args.max_slots, max_len=args.max_len,
                                     prefill_chunk=args.prefill_chunk,
                                     prefill_rows=args.prefill_rows, max_queue=args.max_queue,
                                     page_size=args.page_size, kv_pages=args.kv_pages,
                                     gpu_memory_fraction=args.gpu_memory_fraction,
                                     max_batched_tokens=args.max_batched_tokens,
                                     prefix_cache=not args.no_prefix_cache,
                                     batch_buckets=args.batch_buckets))
    return 0


def _cmd_train_routers(args) -> int:
    import numpy as np

    from polar_jax.evaluate import read_text
    from polar_jax.loading import ModelDir
    from routers.pipeline import mix_corpora, train_routers
    from routers.train import TrainSettings

    from polar_jax.files import check_destination

    if len(set(args.text)) < len(args.text):
        raise PolarJaxError(f"--text names a file twice ({', '.join(args.text)}): give each "
                            "corpus once and weigh them with --text-weights")
    if len(args.text) == 1:
        _refuse(args, ("text_weights",), "with several --text files")
    inputs = {"the model": args.model, **({"the text file": args.text[0]} if len(args.text) == 1
                                           else {f"text file {i + 1}": path
                                                 for i, path in enumerate(args.text)})}
    check_destination(args.out, force=args.force, inputs=inputs)  # before anything is read
    texts = {path: read_text(path) for path in args.text}
    if not args.attn_rank:
        _refuse(args, ("attn_activation",), "with --attn-rank (the low-rank attention router)")
    train_settings = TrainSettings(attn_topk=args.attn_topk, attn_budget=args.attn_budget,
                                   attn_rank=args.attn_rank, attn_probe=args.attn_probe,
                                   attn_loss=args.attn_loss, mlp_rank=args.mlp_rank,
                                   epochs=args.epochs, batch_size=args.batch_size,
                                   learning_rate=args.lr, seed=args.seed,
                                   **settings.given(attn_activation=args.attn_activation))
    mesh = _mesh(args)  # joins the other processes before anything starts JAX's backend
    dtype = settings.compute_dtype(args.dtype)
    model_dir = ModelDir.open(args.model)
    model_dir.config.check_seq_len(args.seq_len)  # before the model loads
    config, model, tokenizer = model_dir.config, model_dir.load(dtype, mesh), model_dir.tokenizer
    corpora = mix_corpora({path: np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"],
                                            np.int32) for path, text in texts.items()},
                          args.text_weights, args.max_tokens)
    summary = train_routers(model, config, corpora, args.out, train_settings, seq_len=args.seq_len,
                            progress=not args.quiet, force=args.force, inputs=inputs, mesh=mesh)
    if args.json:
        keys = ("attn_recall_mean", "attn_recall_per_layer", "attn_groups_per_layer",
                "attn_recall_per_layer_budget", "mlp_recall_mean",
                "mlp_recall_per_layer", "mlp_topk", "tokens_train", "tokens_heldout",
                "tokens_per_corpus", "attn_recall_per_corpus", "attn_topk",
                "attn_groups_kept", "seconds")
        print(json.dumps({k: summary[k] for k in keys} | {"out": args.out}))
        return 0
    timings = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in summary["seconds"].items())
    print(f"routers for {config.model_type} ({config.num_layers} layers) -> {args.out}")
    print(f"tokens: {summary['tokens_train']} train, {summary['tokens_heldout']} held out; "
          f"time: {timings}")
    mlp_k = summary["mlp_topk"]
    print(f"{'layer':>5} {'attn recall':>11} {'mlp recall':>10} " + ("mlp k @ batch 1/16/64/256" if mlp_k else ""))
    for layer, attn in enumerate(summary["attn_recall_per_layer"]):
        mlp = summary["mlp_recall_per_layer"]
        row = f"{layer:>5} {attn:>11.4f} {'-' if mlp is None else f'{mlp[layer]:.4f}':>10} "
        if mlp_k:
            row += " / ".join(str(mlp_k[b][layer]) for b in ("1", "16", "64", "256"))
        print(row)
    mean_mlp = summary["mlp_recall_mean"]
    print(f"{'mean*':>5} {summary['attn_recall_mean']:>11.4f} "
          f"{'-' if mean_mlp is None else f'{mean_mlp:.4f}':>10}   (*layers after the first; "
          f"attention at {summary['attn_groups_kept']} of {config.num_kv_heads} groups)")
    if len(summary["attn_recall_per_corpus"]) > 1:
        for name, recall in summary["attn_recall_per_corpus"].items():
            print(f"attention recall* {recall:.4f} on {name} "
                  f"({summary['tokens_per_corpus'][name]} tokens)")
    if summary["attn_groups_per_layer"] is not None:
        print("adaptive budget, groups kept per layer: "
              + " ".join(map(str, summary["attn_groups_per_layer"]))
              + f" (of {config.num_kv_heads}); recall at these counts: "
              + " ".join(f"{r:.4f}" for r in summary["attn_recall_per_layer_budget"]))
    return 0


def _add_eval_mode_args(parser: argparse.ArgumentParser) -> None:
    """--mode, --routers, the group and page sparsity options of `eval`."""
    parser.add_argument("--mode", choices=["dense", "sparse", "oracle"], default="dense",
                        help="sparse: the routers' groups and neurons; oracle: the true top-k "
                             "groups by output norm and the truly active neurons (with "
                             "page sparsity: the true top pages by attention mass); dense with "
                             "--page-topk or --page-budget: every group, sparse pages")
    parser.add_argument("--routers", help="with --mode sparse (needed) or oracle: routers "
                                          "directory (its calibrated MLP k)")
    _add_sparsity_args(parser, "with --mode sparse or oracle", "with --mode sparse")
    parser.add_argument("--mlp-batch-size", type=settings.cli_type("mlp_batch_size"),
                        help="with --routers: use the MLP k calibrated for this decode batch size "
                             f"{_default(SparsitySettings.mlp_batch_size)}")
    _add_page_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = validate.ArgumentParser(prog="polar-jax",
                     description="Polar Sparsity for batched LLM decoding in JAX and Pallas.")
    parser.add_argument("--version", action="version", version=f"polar-jax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert", help="convert a Hugging Face checkpoint into a polar-jax directory",
        description="Convert a Hugging Face checkpoint (safetensors, or pickled .bin with "
                    "--allow-pickle) into a polar-jax directory of orbax params.")
    convert.add_argument("src", help="local Hugging Face checkpoint directory")
    convert.add_argument("dst", help="output directory (must not exist unless --force)")
    convert.add_argument("--dtype", choices=tuple(DTYPES),
                         help="parameter dtype (default: the checkpoint's own)")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="read pytorch_model.bin files (torch.load with weights_only=True)")
    convert.add_argument("--force", action="store_true", help="replace an existing DST")
    _add_quiet(convert)
    convert.set_defaults(run=_cmd_convert)

    evaluate = commands.add_parser("eval", help="evaluate a model",
                                   description="Evaluate a model.")
    evals = evaluate.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    ppl = evals.add_parser(
        "perplexity", help="perplexity over a text file",
        description="Perplexity: the text is tokenized once without special tokens, truncated to "
                    "--max-tokens, cut into non-overlapping windows of --seq-len tokens, and every "
                    "token after the first of a window is scored.")
    _add_model_args(ppl)
    ppl.add_argument("--text", required=True, help="UTF-8 text file")
    ppl.add_argument("--seq-len", type=settings.cli_type("seq_len"), default=EvalSettings.seq_len,
                     help="tokens per window (at most the model's max_position_embeddings)")
    ppl.add_argument("--max-tokens", type=settings.cli_type("max_tokens"),
                     help="score the first N tokens of the text (default: all)")
    ppl.add_argument("--batch-size", type=settings.cli_type("batch_size"),
                     default=EvalSettings.batch_size, help="windows per step")
    _add_eval_mode_args(ppl)
    ppl.add_argument("--with-dense", action="store_true",
                     help="with --mode sparse or oracle (or page sparsity): also report the "
                          "dense perplexity")
    ppl.add_argument("--with-oracle", action="store_true",
                     help="with --mode sparse: also the oracle's and the dense perplexity, on the "
                          "same windows (the sparse path's gap to the oracle in one command)")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    _add_device_args(ppl)
    ppl.set_defaults(run=_cmd_eval_perplexity)

    ret = evals.add_parser(
        "retrieval", help="long-context retrieval (induction) accuracy",
        description="Long-context retrieval check: windows of --seq-len tokens of the text, each "
                    "with a random token sequence of 64-128 tokens written twice, the copy "
                    "500-900 positions after the first (cut to fit the window); reports the "
                    "greedy accuracy of predicting the copy (served from the KV cache far back) "
                    "and, for scale, the first occurrence (chance).")
    _add_model_args(ret)
    ret.add_argument("--text", required=True, help="UTF-8 text file (the filler)")
    ret.add_argument("--seq-len", type=settings.cli_type("seq_len"), default=1024,
                     help="tokens per window (at most the model's max_position_embeddings)")
    ret.add_argument("--trials", type=settings.cli_type("batch_size"), default=16,
                     help="windows")
    ret.add_argument("--batch-size", type=settings.cli_type("batch_size"),
                     default=EvalSettings.batch_size, help="windows per step")
    ret.add_argument("--seed", type=settings.cli_type("seed"), default=0,
                     help="the windows' random sequences and offsets")
    _add_eval_mode_args(ret)
    ret.add_argument("--json", action="store_true", help="print one JSON object")
    ret.set_defaults(run=_cmd_eval_retrieval)

    gen = commands.add_parser(
        "generate", help="batched generation (greedy by default)",
        description="Generate completions for a batch of prompts. Prompts of different lengths "
                    "are batched together; each sequence stops at EOS or --max-new-tokens.")
    _add_model_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    source.add_argument("--prompts-file", help="a text file with one prompt per line")
    gen.add_argument("--max-new-tokens", type=settings.cli_type("max_new_tokens"),
                     default=GenerationSettings.max_new_tokens,
                     help="new tokens per prompt, at most")
    gen.add_argument("--temperature", type=settings.cli_type("temperature", float),
                     default=GenerationSettings.temperature, help="0: greedy")
    gen.add_argument("--top-k", type=settings.cli_type("top_k"), default=GenerationSettings.top_k,
                     help="keep the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=settings.cli_type("top_p", float),
                     default=GenerationSettings.top_p, help="nucleus sampling mass (1: all)")
    gen.add_argument("--seed", type=settings.cli_type("seed"), default=GenerationSettings.seed,
                     help="sampling seed (batch i draws with seed + its first prompt's index)")
    gen.add_argument("--batch-size", type=settings.cli_type("batch_size"),
                     help="prompts decoded together (default: all)")
    gen.add_argument("--routers", help="routers directory: decode with Polar Sparsity")
    _add_sparsity_args(gen, "with --routers")
    _add_page_args(gen)
    gen.add_argument("--json", action="store_true",
                     help="one JSON object per prompt, then a summary object")
    _add_device_args(gen)
    gen.set_defaults(run=_cmd_generate)

    srv = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (continuous batching)",
        description="Serve the model over HTTP with OpenAI's API (/v1/completions, "
                    "/v1/chat/completions, /v1/models; /health, Prometheus /metrics): requests "
                    "join and leave a running batch of up to --max-slots sequences whose keys and "
                    "values live in a pool of KV pages (--page-size tokens each; as many as fit "
                    "in --gpu-memory-fraction of the device after the weights, or --kv-pages); "
                    "a request waits until its prompt's pages are free, and when pages run out "
                    "the newest request is preempted and recomputed later. Prompts are "
                    "prefilled in chunks of --prefill-chunk tokens between decode steps, within "
                    "--max-batched-tokens an iteration; full pages of a prompt are cached, and a "
                    "later prompt with the same prefix takes them instead of computing them "
                    "(--no-prefix-cache: off). The host schedules the next step while the "
                    "device runs this one; the decode step runs in the smallest of "
                    "--batch-buckets that holds the running requests. Every "
                    "program compiles before the server listens (each one's time on stderr); "
                    "it prints one line on stdout when ready. "
                    "SIGTERM ends in-flight requests (finish_reason \"abort\") and exits 0.")
    srv.add_argument("--model", required=True, help="converted or Hugging Face model directory")
    srv.add_argument("--dtype", choices=tuple(DTYPES),
                     help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    srv.add_argument("--routers", help="routers directory: decode with Polar Sparsity")
    _add_sparsity_args(srv, "with --routers")
    _add_page_args(srv, page_size=False)  # the pool's --page-size is the pages selected
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=validate.cli_type(validate.integer, int, low=0, high=65535),
                     default=8000, help="port to listen on (0: any free one)")
    # The Engine's defaults (not imported here: --help stays fast).
    srv.add_argument("--max-slots", type=_positive, default=64,
                     help="sequences decoded together, at most")
    srv.add_argument("--max-len", type=_positive,
                     help="positions per sequence, prompt and completion together "
                          "(default: the model's)")
    srv.add_argument("--prefill-chunk", type=_positive, default=256,
                     help="prompt tokens prefilled per sequence between decode steps")
    srv.add_argument("--prefill-rows", type=_positive, default=4,
                     help="sequences whose prompt chunks are prefilled together")
    srv.add_argument("--page-size", type=_positive, default=16,
                     help="tokens per KV-cache page")
    srv.add_argument("--kv-pages", type=_positive,
                     help="KV-cache pages in the pool (default: as many as fit)")
    srv.add_argument("--max-batched-tokens", type=_positive,
                     help="tokens an iteration computes at most: the decoding sequences' and "
                          "the prompt chunks' (default: --prefill-rows x --prefill-chunk + "
                          "--max-slots; at least --max-slots + 1)")
    srv.add_argument("--no-prefix-cache", action="store_true",
                     help="compute every prompt in full (default: reuse cached prefix pages)")
    srv.add_argument("--batch-buckets", type=validate.cli_list(_positive),
                     help="comma-separated batch sizes the decode step is compiled for "
                          "(default: 1, 2, 4, ... up to --max-slots; --max-slots is always one)")
    srv.add_argument("--gpu-memory-fraction",
                     type=validate.cli_type(validate.number, float, low=0.0, high=1.0,
                                            low_open=True), default=0.9,
                     help="share of the device's memory this server may take (weights, KV "
                          "pages, program buffers; on a CPU, of the free memory)")
    srv.add_argument("--max-queue", type=_positive, default=256,
                     help="requests waiting for a slot, at most (then 503); also the prompts "
                          "of one request, at most (then 400)")
    limits = srv.add_argument_group("limits per request and connection")
    for name, (kind, default, text) in SERVE_LIMITS.items():
        limits.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text)
    srv.add_argument("--served-model-name",
                     help="the model's name in the API (default: the --model directory's name)")
    srv.add_argument("--api-key",
                     help="every /v1/ request must send 'Authorization: Bearer KEY' (else 401; "
                          "/health and /metrics stay open); default: $POLAR_JAX_API_KEY if set, "
                          "else no key")
    srv.add_argument("--chat-template", metavar="FILE",
                     help="a Jinja chat template for /v1/chat/completions, checked at start "
                          "(default: the tokenizer's own; a model without one answers chat "
                          "requests 400)")
    srv.add_argument("--quiet", action="store_true",
                     help="no startup progress and no access log on stderr")
    srv.add_argument("--tp", type=_positive, default=1,
                     help="tensor parallel: split the model over N devices of this host")
    srv.set_defaults(run=_cmd_serve)

    tr = commands.add_parser(
        "train-routers", help="train the attention-group and MLP routers of a model",
        description="Collect router data by running the dense model over a text, train every "
                    "layer's routers together (Optax AdamW, weighted BCE or a ranking loss), "
                    "calibrate the attention budget (adaptive) and the MLP "
                    "top-k per batch size, measure held-out recall and save the routers.")
    _add_model_args(tr)
    tr.add_argument("--text", required=True, action="append",
                    help="UTF-8 training text (e.g. WikiText-2 valid); repeat to mix corpora, "
                         "each held out in the same proportions, recall reported per corpus")
    tr.add_argument("--text-weights", type=_weights,
                    help="with several --text: comma-separated shares of the tokens drawn from "
                         "each (default: weighted by tokens, each file's own share)")
    tr.add_argument("--out", required=True, help="routers directory to write")
    tr.add_argument("--max-tokens", type=settings.cli_type("max_tokens"),
                    help="use N tokens, the first of each text by its share (default: all, or "
                         "the most the texts supply at --text-weights)")
    # The defaults of TrainSettings and train_routers (not imported here: --help stays fast).
    tr.add_argument("--attn-topk", type=settings.cli_type("attn_topk", float), default=0.5,
                    help="fraction of KV groups kept per token (labels and metrics)")
    tr.add_argument("--attn-budget", choices=("uniform", "adaptive"), default="uniform",
                    help="groups kept per layer: --attn-topk of every layer's, or calibrated per "
                         "layer on held-out tokens (averaging --attn-topk; multiples of --tp), "
                         "stored with the routers for decoding, evaluation and serving")
    tr.add_argument("--attn-rank", type=_positive,
                    help="the attention router's form: a low-rank two-layer router of this rank "
                         "(default: linear, d -> KV groups)")
    tr.add_argument("--attn-activation", choices=("relu", "silu"),
                    help="with --attn-rank: the low-rank router's activation (default: relu)")
    tr.add_argument("--attn-probe", type=_positive, metavar="W",
                    help="the attention router also reads each group's attention output over "
                         "the last W positions (a local probe: W / context of a dense "
                         "attention's reads; default: none)")
    tr.add_argument("--attn-loss", choices=("bce", "rank"), default="bce",
                    help="attention router loss: BCE on the top-k groups, or pairwise ranking "
                         "of the groups' output norms")
    tr.add_argument("--mlp-rank", type=_positive, default=1024, help="MLP router rank (capped at d)")
    tr.add_argument("--epochs", type=_positive, default=10, help="at most; early stopping")
    tr.add_argument("--batch-size", type=_positive, default=64, help="tokens per step")
    tr.add_argument("--lr", type=validate.cli_type(validate.number, float, low=0, low_open=True),
                    default=1e-4, help="AdamW learning rate")
    tr.add_argument("--seq-len", type=settings.cli_type("seq_len"), default=512,
                    help="collection window")
    tr.add_argument("--seed", type=settings.cli_type("seed"), default=0,
                    help="router initialisation and shuffling seed")
    tr.add_argument("--force", action="store_true", help="replace an existing --out")
    tr.add_argument("--json", action="store_true", help="print one JSON object of metrics")
    _add_device_args(tr)
    tr.set_defaults(run=_cmd_train_routers)

    # Listed for the help page only: main() hands everything after `bench` to its own parsers.
    commands.add_parser("bench", help="GPU benchmarks (see `polar-jax bench --help`)",
                        add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv` (default: `sys.argv[1:]`); returns the exit status: 0, 2
    for bad input (one line on stderr), 130 when interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's warnings are not the user's
    try:
        if argv[:1] == ["bench"]:  # its own parsers take all the rest, --help included
            from polar_jax.bench import main as bench_main

            return bench_main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except SystemExit as stop:  # --help, --version, or a usage error already printed
        return stop.code
    except PolarJaxError as err:
        print(f"polar-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("polar-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
