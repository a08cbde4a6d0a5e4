"""The PyTorch peers of the benchmarks, in a process of their own.

`python -m polar_jax.bench.torch_peer` reads a job from stdin as JSON and prints its result as
one marked JSON line (`polar_jax.bench.jobs`). The benchmarks run it with `run` before JAX
takes the GPU, so that torch and JAX never share the process or the device's memory. Two jobs:

- `kernels` (`bench kernels`): the copy bandwidth and the dense baselines of the kernels, fp16:
  `scaled_dot_product_attention` decode and the ReLU MLP through cuBLAS, each timed by
  replaying a CUDA graph of N calls (median of repeats);
- `decode` (`bench decode`): Hugging Face transformers with a static KV cache and SDPA, random
  weights; the cache is filled by a real prefill; N greedy steps timed on the host clock
  between device syncs (an eager decode step is host-bound, so the host loop is part of its
  cost; median of repeats), after `torch.compile` of the forward where asked and it works, else
  eager. Runs on the CPU too (the tests' smoke run).

Nothing here imports JAX; torch is imported only in the peer's process.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from polar_jax.bench import jobs

KERNELS_TIMEOUT_S = 600
DECODE_TIMEOUT_S = 1800


# ------------------------------------------------------------------------------------------
# The benchmarks' side
# ------------------------------------------------------------------------------------------

def cuda_available() -> bool:
    """Whether torch imports and sees a CUDA device (asked in a subprocess)."""
    try:
        done = subprocess.run([sys.executable, "-c", "import torch, sys; "
                               "sys.exit(0 if torch.cuda.is_available() else 3)"],
                              capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def run(job: str, timeout: int, **payload) -> dict:
    """The result of peer job `job` ("kernels" or "decode") on `payload`, or {"error": ...}."""
    return jobs.run(__name__, dict(payload, job=job), timeout)


# ------------------------------------------------------------------------------------------
# The peer's side
# ------------------------------------------------------------------------------------------

def graph_time(calls, reps: int):
    """(median, min, max ms per call, how) of `calls` replayed as one CUDA graph (eager where
    capture fails), after two warm-up calls."""
    import torch

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        replay, how = graph.replay, "cuda-graph"
    except Exception:
        def replay():
            for call in calls:
                call()
        how = "eager"
    replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    del replay
    return statistics.median(times), min(times), max(times), how


def _copy_graphs(case: dict, reps: int) -> dict[str, float]:
    """ms per copy of `case["bytes"]`: `copy_` and a multiply kernel, each in a CUDA graph."""
    import torch

    n, numel = case["n_calls"], case["bytes"] // 2
    srcs = [torch.randn(numel, device="cuda", dtype=torch.float16) for _ in range(2)]
    dsts = [torch.empty_like(srcs[0]) for _ in range(2)]
    copies = [lambda i=i: dsts[i % 2].copy_(srcs[i % 2]) for i in range(n)]
    multiplies = [lambda i=i: torch.mul(srcs[i % 2], 1.0, out=dsts[i % 2]) for i in range(n)]
    return {"copy_ graph": graph_time(copies, reps)[0],
            "mul kernel graph": graph_time(multiplies, reps)[0]}


def _copy_eager(case: dict, reps: int) -> float:
    """ms per copy of `case["bytes"]`, from eager `copy_`s of four times as much."""
    import torch

    big = 4 * case["bytes"]
    src = torch.randn(big // 2, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 3 * case["bytes"] / big)
    return statistics.median(times)


def _copy(case: dict, reps: int, rec: dict) -> None:
    """Three ways; the fastest is the copy bandwidth (bytes read + bytes written)."""
    import torch

    methods = _copy_graphs(case, reps)
    torch.cuda.empty_cache()
    methods["copy_ eager 4x size"] = _copy_eager(case, reps)
    rec["methods_tbps"] = {k: 2 * case["bytes"] / (v * 1e-3) / 1e12 for k, v in methods.items()}
    best = min(methods, key=methods.get)
    rec["ms"], rec["how"] = methods[best], best
    rec["tbps"] = 2 * case["bytes"] / (rec["ms"] * 1e-3) / 1e12


def _attention(case: dict, reps: int, rotation_bytes: int, rec: dict) -> None:
    """SDPA decode on [B, Hkv, S, D] caches rotating over `rotation_bytes`: with enable_gqa and
    with the query heads of a group as rows, the faster of the two kept."""
    import torch
    import torch.nn.functional as F

    n, dev = case["n_calls"], "cuda"
    B, Hq, Hkv, S, D = case["B"], case["Hq"], case["Hkv"], case["S"], case["D"]
    G = Hq // Hkv
    cache = 2 * B * Hkv * S * D * 2
    n_sets = max(1, -(-rotation_bytes // cache))
    ks = [torch.randn(B, Hkv, S, D, device=dev, dtype=torch.float16) for _ in range(n_sets)]
    vs = [torch.randn(B, Hkv, S, D, device=dev, dtype=torch.float16) for _ in range(n_sets)]
    qs = [torch.randn(B, Hq, 1, D, device=dev, dtype=torch.float16) for _ in range(4)]
    best = None
    variants = ([("sdpa", False)] if G == 1
                else [("sdpa enable_gqa", True), ("sdpa grouped-rows", False)])
    for name, gqa in variants:
        if gqa:
            calls = [lambda i=i: F.scaled_dot_product_attention(
                qs[i % 4], ks[i % n_sets], vs[i % n_sets], enable_gqa=True) for i in range(n)]
        else:
            calls = [lambda i=i: F.scaled_dot_product_attention(
                qs[i % 4].view(B, Hkv, G, D), ks[i % n_sets], vs[i % n_sets]) for i in range(n)]
        try:
            t = graph_time(calls, reps)
        except Exception as err:  # a variant the build does not support
            rec.setdefault("errors", []).append(f"{name}: {err}"[:300])
            continue
        rec.setdefault("variants", {})[name] = t[0]
        if best is None or t[0] < best[0][0]:
            best = (t, name)
    if best is not None:
        (rec["ms"], rec["ms_min"], rec["ms_max"], rec["how"]), rec["variant"] = best


def _mlp(case: dict, reps: int, rec: dict) -> None:
    """The dense ReLU MLP, fp16: addmm(b_out, relu(linear(x, w_in, b_in)), w_out)."""
    import torch
    import torch.nn.functional as F

    dev = "cuda"
    B, d, N = case["B"], case["d"], case["N"]
    w_in = torch.randn(N, d, device=dev, dtype=torch.float16) * d ** -0.5
    w_out = torch.randn(N, d, device=dev, dtype=torch.float16) * N ** -0.5
    b_in = torch.randn(N, device=dev, dtype=torch.float16)
    b_out = torch.randn(d, device=dev, dtype=torch.float16)
    xs = [torch.randn(B, d, device=dev, dtype=torch.float16) for _ in range(8)]
    calls = [lambda i=i: torch.addmm(b_out, F.relu(F.linear(xs[i % 8], w_in, b_in)), w_out)
             for i in range(case["n_calls"])]
    rec["ms"], rec["ms_min"], rec["ms_max"], rec["how"] = graph_time(calls, reps)


def kernel_baselines(cases: list[dict], reps: int, rotation_bytes: int) -> dict:
    """{"torch", "device", "cases"}: each case (kind "copy", "attn" or "mlp") with its times
    (ms, ms_min, ms_max, how; copy: tbps) or its "error"."""
    import torch

    torch.manual_seed(0)
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "cases": []}
    for case in cases:
        rec = dict(case)
        try:
            if case["kind"] == "copy":
                _copy(case, reps, rec)
            elif case["kind"] == "attn":
                _attention(case, reps, rotation_bytes, rec)
            elif case["kind"] == "mlp":
                _mlp(case, reps, rec)
        except Exception as err:
            rec["error"] = f"{type(err).__name__}: {err}"[:500]
        torch.cuda.empty_cache()
        out["cases"].append(rec)
    return out


def decode_peer(hf: dict, batch_sizes, context_lens, steps: int, repeats: int, dtype: str,
                compile_model: bool) -> dict:
    """{"rows": [{batch, context, torch_ms, torch_tokens_per_s} or {..., torch_skipped}],
    "mode", "torch", "transformers"}: Hugging Face transformers decoding a model of config
    `hf` (random weights) `steps` tokens from each context length."""
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.AutoConfig.for_model(**hf)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, dtype)).eval()
    forward, mode = model.forward, "eager"
    if dev == "cuda" and compile_model:
        try:
            forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
            mode = "torch.compile"
        except Exception as err:
            mode = f"eager (compile failed: {type(err).__name__})"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rows = []
    for batch in batch_sizes:
        for context in context_lens:
            try:
                # One slot per token of a run: a static cache writes where its own counter
                # points (newer transformers ignore cache_position), so every repeat starts
                # from a reset cache and a fresh prefill, then decodes N tokens from the
                # context length.
                cache = transformers.StaticCache(config=config, max_cache_len=context + steps + 1)
                ids = torch.randint(0, config.vocab_size, (batch, context), device=dev)
                times = []
                with torch.no_grad():
                    for repeat in range(repeats + 1):  # the first warms up (and compiles)
                        cache.reset()
                        out = model(ids, past_key_values=cache, use_cache=True,
                                    cache_position=torch.arange(context, device=dev))
                        token = out.logits[:, -1].argmax(-1, keepdim=True)
                        del out
                        sync()
                        start = time.perf_counter()
                        for i in range(steps):
                            pos = torch.tensor([context + i], device=dev)
                            logits = forward(token, past_key_values=cache, cache_position=pos,
                                             use_cache=True).logits
                            token = logits[:, -1].argmax(-1, keepdim=True)
                        sync()
                        if repeat:
                            times.append((time.perf_counter() - start) / steps)
                ms = statistics.median(times) * 1e3
                rows.append(dict(batch=batch, context=context, torch_ms=round(ms, 4),
                                 torch_tokens_per_s=round(batch / ms * 1e3, 1)))
            except torch.OutOfMemoryError:
                rows.append(dict(batch=batch, context=context, torch_skipped="out of memory"))
            finally:
                cache = None
                if dev == "cuda":
                    torch.cuda.empty_cache()
    return {"rows": rows, "mode": mode, "torch": torch.__version__,
            "transformers": transformers.__version__}


JOBS = {"kernels": kernel_baselines, "decode": decode_peer}


def main() -> None:
    job = json.load(sys.stdin)
    jobs.reply(JOBS[job.pop("job")](**job))


if __name__ == "__main__":
    main()
