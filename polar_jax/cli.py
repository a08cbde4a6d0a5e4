"""The `polar-jax` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from polar_jax.errors import PolarJaxError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype, as every command that runs a model takes them."""
    parser.add_argument("--model", required=True, help="converted or Hugging Face model directory")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")


def _compute_dtype(args):
    from polar_jax.dtypes import default_compute_dtype, parse_dtype

    return parse_dtype(args.dtype) if args.dtype else default_compute_dtype()


def _cmd_convert(args) -> int:
    from convert import convert_checkpoint

    start = time.perf_counter()
    dst = convert_checkpoint(args.src, args.dst, dtype=args.dtype, allow_pickle=args.allow_pickle,
                             force=args.force, progress=sys.stderr.isatty())
    print(f"converted {args.src} -> {dst} in {time.perf_counter() - start:.1f} s")
    return 0


def _dense_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _cmd_eval_perplexity(args) -> int:
    import functools

    import jax.numpy as jnp

    from polar_jax.evaluate import perplexity, read_text
    from polar_jax.loading import load_model, load_tokenizer
    from polar_jax.sparsity import MaskedOps, SparsityPlan
    from routers.model import load_routers

    text = read_text(args.text)
    dtype = _compute_dtype(args)
    if args.mode == "sparse" and not args.routers:
        raise PolarJaxError("--mode sparse needs --routers DIR (trained by `polar-jax train-routers`)")
    start = time.perf_counter()
    config, model = load_model(args.model, dtype)
    tokenizer = load_tokenizer(args.model)
    routers = metadata = None
    if args.routers:
        routers, metadata = load_routers(args.routers, config)
    run = functools.partial(perplexity, model, config, tokenizer, text, seq_len=args.seq_len,
                            max_tokens=args.max_tokens, batch_size=args.batch_size,
                            progress=sys.stderr.isatty() and not args.json)
    if args.mode == "dense":
        result = run()
    else:
        plan = SparsityPlan.build(config, metadata, args.attn_topk, args.dense_layers,
                                  args.mlp_batch_size)
        make_ops = lambda attend, routers: MaskedOps(attend, args.mode, plan, config.num_kv_heads,
                                                     routers)
        result = run(make_ops=make_ops, routers=routers)
        result.update(attn_topk=args.attn_topk, dense_layers=list(args.dense_layers),
                      mlp_batch_size=args.mlp_batch_size,
                      mlp_neurons_per_layer=list(plan.mlp_neurons))
        if args.with_dense:
            result["dense_perplexity"] = run()["perplexity"]
    result.update(mode=args.mode, model=args.model, dtype=jnp.dtype(dtype).name,
                  seq_len=args.seq_len, seconds=round(time.perf_counter() - start, 3))
    if args.json:
        print(json.dumps(result))
    else:
        extra = "" if args.mode == "dense" else f" ({args.mode}, {args.attn_topk:g} of KV groups)"
        print(f"perplexity {result['perplexity']:.4f}{extra} over {result['tokens']} tokens "
              f"({result['windows']} windows of {args.seq_len}, {result['dtype']}, "
              f"{result['seconds']:.1f} s)")
        if "dense_perplexity" in result:
            print(f"dense perplexity {result['dense_perplexity']:.4f}")
    return 0


def _read_prompts(args) -> list[str]:
    if args.prompts_file is None:
        return args.prompt
    from polar_jax.evaluate import read_text

    prompts = [line for line in read_text(args.prompts_file).splitlines() if line.strip()]
    if not prompts:
        raise PolarJaxError(f"{args.prompts_file} holds no prompts (one per line)")
    return prompts


def _cmd_generate(args) -> int:
    from polar_jax.decode import Decoder
    from polar_jax.sampling import SamplingParams

    prompts = _read_prompts(args)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p).validated()
    dtype = _compute_dtype(args)
    decoder = Decoder.load(args.model, dtype, routers=args.routers, attn_topk=args.attn_topk,
                           dense_layers=args.dense_layers)
    result = decoder.generate(prompts, args.max_new_tokens, sampling, args.seed, args.batch_size)
    summary = {"mode": "sparse" if decoder.sparse else "dense",
               "tokens_per_second": round(result.tokens_per_second, 2),
               "batch_size": result.batch_size, "new_tokens": result.new_tokens,
               "seconds": round(result.seconds, 4), "compile_seconds": round(result.compile_seconds, 3)}
    for c in result.completions:
        if args.json:
            print(json.dumps({"prompt": c.prompt, "completion": c.text, "tokens": c.tokens}))
        else:
            print(f"{c.prompt}\033[1m{c.text}\033[0m\n" if sys.stdout.isatty() else f"{c.prompt}{c.text}\n")
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['new_tokens']} new tokens at batch size {summary['batch_size']}: "
              f"{summary['tokens_per_second']:.1f} tokens/s ({summary['seconds']:.2f} s, plus "
              f"{summary['compile_seconds']:.1f} s compiling)")
    return 0


def _cmd_train_routers(args) -> int:
    import numpy as np

    from polar_jax.evaluate import read_text
    from polar_jax.loading import load_model, load_tokenizer
    from routers.pipeline import train_routers
    from routers.train import TrainSettings

    text = read_text(args.text)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise PolarJaxError(f"{out} already exists; pass --force to replace it")
    settings = TrainSettings(attn_topk=args.attn_topk, mlp_rank=args.mlp_rank, epochs=args.epochs,
                             batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    dtype = _compute_dtype(args)
    config, model = load_model(args.model, dtype)
    tokenizer = load_tokenizer(args.model)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)[:args.max_tokens]
    summary = train_routers(model, config, ids, out, settings, seq_len=args.seq_len,
                            progress=sys.stderr.isatty() and not args.json)
    if args.json:
        keys = ("attn_recall_mean", "attn_recall_per_layer", "mlp_recall_mean",
                "mlp_recall_per_layer", "mlp_topk", "tokens_train", "tokens_heldout", "attn_topk",
                "attn_groups_kept", "seconds")
        print(json.dumps({k: summary[k] for k in keys} | {"out": str(out)}))
        return 0
    print(f"routers for {config.model_type} ({config.num_layers} layers) -> {out}")
    print(f"tokens: {summary['tokens_train']} train, {summary['tokens_heldout']} held out; "
          f"time: {summary['seconds']}")
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
    return 0


def _cmd_bench(args) -> int:
    from polar_jax.bench import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polar-jax",
        description="Polar Sparsity for batched LLM decoding in JAX and Pallas.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert", help="convert a Hugging Face checkpoint into a polar-jax directory",
        description="Convert a Hugging Face checkpoint (safetensors, or pickled .bin with "
                    "--allow-pickle) into a polar-jax directory of orbax params.")
    convert.add_argument("src", help="Hugging Face checkpoint directory (or hub id, when online)")
    convert.add_argument("dst", help="output directory (must not exist unless --force)")
    convert.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                         help="parameter dtype (default: the checkpoint's own)")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="read pytorch_model.bin files (torch.load with weights_only=True)")
    convert.add_argument("--force", action="store_true", help="replace an existing DST")
    convert.set_defaults(run=_cmd_convert)

    evaluate = commands.add_parser("eval", help="evaluate a model")
    evals = evaluate.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    ppl = evals.add_parser(
        "perplexity", help="perplexity over a text file",
        description="Perplexity: the text is tokenized once without special tokens, truncated to "
                    "--max-tokens, cut into non-overlapping windows of --seq-len tokens, and every "
                    "token after the first of a window is scored.")
    _add_model_args(ppl)
    ppl.add_argument("--text", required=True, help="UTF-8 text file")
    ppl.add_argument("--seq-len", type=_positive_int, default=512)
    ppl.add_argument("--max-tokens", type=_positive_int, default=None)
    ppl.add_argument("--batch-size", type=_positive_int, default=8, help="windows per step")
    ppl.add_argument("--routers", help="routers directory (for --mode sparse; its calibrated MLP k)")
    ppl.add_argument("--mode", choices=["dense", "sparse", "oracle"], default="dense",
                     help="sparse: the routers' groups and neurons; oracle: the true top-k groups "
                          "by output norm and the truly active neurons")
    ppl.add_argument("--attn-topk", type=_fraction, default=0.5, help="fraction of KV groups kept")
    ppl.add_argument("--dense-layers", type=_dense_layers, default=(0,),
                     help="comma-separated layers whose attention stays dense (default: 0)")
    ppl.add_argument("--mlp-batch-size", type=_positive_int, default=1,
                     help="use the MLP k calibrated for this decode batch size")
    ppl.add_argument("--with-dense", action="store_true",
                     help="also report the dense perplexity, for comparison")
    ppl.add_argument("--json", action="store_true", help="print one JSON object")
    ppl.set_defaults(run=_cmd_eval_perplexity)

    gen = commands.add_parser(
        "generate", help="batched generation (greedy by default)",
        description="Generate completions for a batch of prompts. Prompts of different lengths "
                    "are batched together; each sequence stops at EOS or --max-new-tokens.")
    _add_model_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    source.add_argument("--prompts-file", help="a text file with one prompt per line")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=_positive_int, default=None,
                     help="prompts decoded together (default: all)")
    gen.add_argument("--routers", help="routers directory: decode with Polar Sparsity")
    gen.add_argument("--attn-topk", type=_fraction, default=0.5,
                     help="with --routers: fraction of KV groups each sequence reads")
    gen.add_argument("--dense-layers", type=_dense_layers, default=(0,),
                     help="with --routers: comma-separated layers whose attention stays dense")
    gen.add_argument("--json", action="store_true",
                     help="one JSON object per prompt, then a summary object")
    gen.set_defaults(run=_cmd_generate)

    tr = commands.add_parser(
        "train-routers", help="train the attention-group and MLP routers of a model",
        description="Collect router data by running the dense model over a text, train every "
                    "layer's routers together (Optax AdamW, weighted BCE), calibrate the MLP "
                    "top-k per batch size, measure held-out recall and save the routers.")
    _add_model_args(tr)
    tr.add_argument("--text", required=True, help="UTF-8 training text (e.g. WikiText-2 valid)")
    tr.add_argument("--out", required=True, help="routers directory to write")
    tr.add_argument("--max-tokens", type=_positive_int, default=None, help="use the first N tokens")
    tr.add_argument("--attn-topk", type=_fraction, default=0.5,
                    help="fraction of KV groups kept per token (labels and metrics)")
    tr.add_argument("--mlp-rank", type=_positive_int, default=1024, help="MLP router rank (capped at d)")
    tr.add_argument("--epochs", type=_positive_int, default=10, help="at most; early stopping")
    tr.add_argument("--batch-size", type=_positive_int, default=64, help="tokens per step")
    tr.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    tr.add_argument("--seq-len", type=_positive_int, default=512, help="collection window")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--force", action="store_true", help="replace an existing --out")
    tr.add_argument("--json", action="store_true", help="print one JSON object of metrics")
    tr.set_defaults(run=_cmd_train_routers)

    bench = commands.add_parser("bench", help="GPU benchmarks (see `polar-jax bench --help`)",
                                add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PolarJaxError as err:
        print(f"polar-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("polar-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
