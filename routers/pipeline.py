"""`polar-jax train-routers`: collect, train, calibrate, evaluate, save."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from models import ModelConfig
from models.sharding import tp_size
from pallas_kernels.selection import groups_to_keep, mlp_topk_step
from polar_jax.errors import PolarJaxError
from polar_jax.files import Staging, atomic_output, check_destination
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


def train_routers(model, config: ModelConfig, ids: np.ndarray, out: str | Path,
                  settings: TrainSettings, seq_len: int = 512, collect_batch_size: int = 8,
                  progress: bool = False, *, force: bool = False,
                  inputs: Mapping[str, str | Path | None] | None = None,
                  mesh: Mesh | None = None) -> dict:
    """Runs the whole pipeline on the token ids `ids`; returns the summary saved in routers.json.

    The routers directory is written through `polar_jax.files.atomic_output`: `out` must not
    exist (unless `force`) nor overlap `inputs` ({role: path}, e.g. the model directory and the
    text file); the collected data lives in its scratch space, beside `out`. With a `mesh`
    (the model loaded onto it), collection and training are data parallel over its `data` axis;
    in a multi-process run only process 0 writes `out`.
    """
    check_batch_split(settings, mesh)
    parts = split_tokens(ids)
    minimum = max(2 * seq_len, 10 * settings.batch_size)
    if len(parts[0]) < settings.batch_size or min(len(p) for p in parts[1:]) < 2 or len(ids) < minimum:
        raise PolarJaxError(
            f"the text has {len(ids)} tokens; router training needs at least {minimum} "
            f"(80% train, 10% calibration, 10% metrics)")
    with _staging(out, force, inputs) as staging:
        start = time.perf_counter()
        train_data, calib_data, metric_data = (
            collect(model, config, part, staging.scratch / name, seq_len, collect_batch_size,
                    progress, mesh)
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
        if budget_costs is not None:  # recall at the calibrated counts
            metrics["attn_recall_per_layer_budget"] = evaluate(
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
            "mlp_rank": min(settings.mlp_rank, config.hidden_size),
            **metrics,
            "mlp_topk": None if mlp_topk is None else {str(b): k for b, k in mlp_topk.items()},
            "mlp_topk_step": mlp_topk_step(config.mlp_dim),
            "tokens_train": train_data.num_tokens,
            "tokens_heldout": calib_data.num_tokens + metric_data.num_tokens,
            "tokens_calibration": calib_data.num_tokens,
            "history": history,
            "settings": dataclasses.asdict(settings),
            "seconds": {"collect": round(collect_seconds, 2), "budget": round(budget_seconds, 2),
                        "train": round(train_seconds, 2),
                        "calibrate": round(calibrate_seconds, 2)},
        }
        write_routers(routers, summary, staging.path)
    return summary
