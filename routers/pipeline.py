"""`polar-jax train-routers`: collect, train, calibrate, evaluate, save."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from models import ModelConfig
from models.sharding import tp_size
from pallas_kernels.selection import groups_to_keep, mlp_topk_step
from polar_jax.errors import PolarJaxError
from polar_jax.files import Staging, atomic_output, check_destination
from polar_jax.windows import stream_windows
from routers.budget import calibrate_attn_budget
from routers.collect import collect
from routers.model import model_fingerprint, write_routers
from routers.train import (
    TrainSettings,
    calibrate_mlp_topk,
    check_batch_split,
    evaluate,
    train,
    uniform_groups,
)

HELDOUT_FRACTION = 0.2


def split_tokens(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train: first 80%, calibration: next 10%, metrics: last 10%) of the token stream."""
    heldout = int(len(ids) * HELDOUT_FRACTION)
    train_end = len(ids) - heldout
    calib_end = train_end + heldout // 2
    return ids[:train_end], ids[train_end:calib_end], ids[calib_end:]


def mix_corpora(corpora: Mapping[str, np.ndarray], weights: Sequence[float] | None = None,
                max_tokens: int | None = None) -> dict[str, np.ndarray]:
    """Each corpus's first tokens, so many that corpus i's share of the total is weights[i] /
    sum(weights) (default: weighted by tokens, each corpus's share of all of them); the total
    is `max_tokens`, or the most the corpora supply at those shares. The counts (largest
    remainders) add up to the total exactly; a corpus too short for its share is refused."""
    names, lengths = list(corpora), np.array([len(ids) for ids in corpora.values()], np.int64)
    if weights is None:
        weights = lengths
        max_tokens = None if max_tokens is None else min(max_tokens, int(lengths.sum()))
    elif len(weights) != len(names):
        raise PolarJaxError(f"--text-weights has {len(weights)} weights for {len(names)} --text "
                            "files: give one weight per file")
    shares = np.asarray(weights, np.float64) / np.sum(weights)
    if not (np.isfinite(shares).all() and (shares > 0).all()):
        raise PolarJaxError(f"--text-weights must be positive numbers, got {list(weights)}")
    total = max_tokens if max_tokens is not None else int(np.min(lengths / shares) + 1e-9)
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[:total - counts.sum()]] += 1
    short = [(n, length, count) for n, length, count in zip(names, lengths, counts) if count > length]
    if short:
        name, length, count = short[0]
        raise PolarJaxError(f"{name} has {length} tokens; its share of {total} tokens needs "
                            f"{count}: lower --max-tokens or its weight")
    return {name: corpora[name][:count] for name, count in zip(names, counts)}


@contextlib.contextmanager
def _staging(out: str | Path, force: bool, inputs: Mapping[str, str | Path | None] | None
             ) -> Iterator[Staging]:
    """Where this process assembles the routers directory: process 0 through `atomic_output`;
    in a multi-process run, every other process (which collects its own copy of the data and
    takes part in the collective save) in a private directory beside `out`, removed after."""
    if jax.process_index() == 0:
        with atomic_output(out, force=force, inputs=inputs) as staging:
            yield staging
        return
    entry = check_destination(out, force=force, inputs=inputs or {})
    parent = next(directory for directory in entry.parents if directory.is_dir())
    with tempfile.TemporaryDirectory(prefix=f".{entry.name}.process{jax.process_index()}-",
                                     dir=parent) as private:
        yield Staging(Path(private), Path(private) / "scratch")


def train_routers(model, config: ModelConfig, ids: np.ndarray | Mapping[str, np.ndarray],
                  out: str | Path,
                  settings: TrainSettings, seq_len: int = 512, collect_batch_size: int = 8,
                  progress: bool = False, *, force: bool = False,
                  inputs: Mapping[str, str | Path | None] | None = None,
                  mesh: Mesh | None = None) -> dict:
    """Runs the whole pipeline on the token ids `ids`, or on several corpora ({name: ids},
    e.g. from `mix_corpora`), each split by `split_tokens` (so each is held out in the same
    proportions; the recall is also reported per corpus); returns the summary saved in
    routers.json.

    The routers directory is written through `polar_jax.files.atomic_output`: `out` must not
    exist (unless `force`) nor overlap `inputs` ({role: path}, e.g. the model directory and the
    text file); the collected data lives in its scratch space, beside `out`. With a `mesh`
    (the model loaded onto it), collection and training are data parallel over its `data` axis;
    in a multi-process run only process 0 writes `out`.
    """
    check_batch_split(settings, mesh)
    config.check_seq_len(seq_len)
    corpora = {"the text": ids} if isinstance(ids, np.ndarray) else dict(ids)
    total = sum(len(c) for c in corpora.values())
    minimum = max(2 * seq_len, 10 * settings.batch_size)
    if total < minimum:
        raise PolarJaxError(
            f"the text has {total} tokens; router training needs at least {minimum} "
            f"(80% train, 10% calibration, 10% metrics)")
    splits = {name: split_tokens(c) for name, c in corpora.items()}
    for name, (train_ids, *heldout) in splits.items():
        if len(train_ids) < 1 or min(len(p) for p in heldout) < 2:
            raise PolarJaxError(f"{name} has {len(corpora[name])} tokens; each corpus needs at "
                                "least 20 (80% train, 10% calibration, 10% metrics)")
    parts = [[split[i] for split in splits.values()] for i in range(3)]  # train, calib, metric
    with _staging(out, force, inputs) as staging:
        start = time.perf_counter()
        train_data, calib_data, metric_data = (
            collect(model, config, part, staging.scratch / name, seq_len, collect_batch_size,
                    progress, mesh, settings.attn_probe)
            for name, part in zip(("train", "calib", "metric"), parts))
        collect_seconds = time.perf_counter() - start
        start = time.perf_counter()
        uniform = uniform_groups(config, settings.attn_topk)
        attn_groups, budget_costs = uniform, None
        if settings.attn_budget == "adaptive":
            attn_groups, budget_costs = calibrate_attn_budget(
                model, config, parts[1], settings.attn_topk, tp_size(mesh), seq_len,
                collect_batch_size, progress)
        budget_seconds = time.perf_counter() - start
        start = time.perf_counter()
        routers, history = train(config, train_data, calib_data, settings, progress, mesh,
                                 attn_groups)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        mlp_topk = None
        if routers.has_mlp:
            mlp_topk = calibrate_mlp_topk(routers, config, calib_data, seed=settings.seed,
                                          progress=progress)
        calibrate_seconds = time.perf_counter() - start
        metrics = evaluate(routers, config, metric_data, uniform,
                           None if mlp_topk is None else mlp_topk[1])
        metrics["attn_recall_per_corpus"], first = {}, 0
        for name, metric_ids in zip(corpora, parts[2]):
            count = int(stream_windows(metric_ids, seq_len)[1].sum())
            metrics["attn_recall_per_corpus"][name] = evaluate(
                routers, config, metric_data, uniform, None,
                tokens=range(first, first + count))["attn_recall_mean"]
            first += count
        metrics["attn_recall_per_layer_budget"] = None if budget_costs is None else evaluate(
            routers, config, metric_data, attn_groups, None)["attn_recall_per_layer"]
        summary = {
            "model": model_fingerprint(config),
            "attn_topk": settings.attn_topk,
            "attn_groups_kept": groups_to_keep(settings.attn_topk, config.num_kv_heads),
            "attn_budget": settings.attn_budget,
            "attn_groups_per_layer": None if budget_costs is None else list(attn_groups),
            "attn_budget_nll_increase": None if budget_costs is None else [
                [None if np.isnan(c) else round(float(c), 5) for c in row] for row in budget_costs],
            "attn_rank": settings.attn_rank,
            "attn_activation": settings.attn_activation,
            "attn_probe": settings.attn_probe,
            "mlp_rank": min(settings.mlp_rank, config.hidden_size),
            **metrics,
            "mlp_topk": None if mlp_topk is None else {str(b): k for b, k in mlp_topk.items()},
            "mlp_topk_step": mlp_topk_step(config.mlp_dim),
            "tokens_train": train_data.num_tokens,
            "tokens_heldout": calib_data.num_tokens + metric_data.num_tokens,
            "tokens_calibration": calib_data.num_tokens,
            "tokens_per_corpus": {name: len(c) for name, c in corpora.items()},
            "history": history,
            "settings": dataclasses.asdict(settings),
            "seconds": {"collect": round(collect_seconds, 2),
                        **({} if budget_costs is None else {"budget": round(budget_seconds, 2)}),
                        "train": round(train_seconds, 2),
                        "calibrate": round(calibrate_seconds, 2)},
        }
        write_routers(routers, summary, staging.path)
    return summary
