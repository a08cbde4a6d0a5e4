"""Training the routers with Optax, calibrating the MLP top-k per batch size, and measuring
held-out recall.

Data splits (of the token stream): the first 80% trains; of the last 20%, never trained on,
the first half calibrates the MLP top-k and drives early stopping, the second half measures
every reported metric.

Over a mesh, training is data parallel: each step's tokens are split over `data`, the router
parameters and optimizer state replicated (XLA all-reduces the gradients); the held-out loss
runs replicated, calibration and metrics on one device.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from models import ModelConfig
from models.sharding import DATA, dp_size, global_array, replicated, to_host
from pallas_kernels.selection import (
    CALIBRATION_BATCH_SIZES,
    COVERAGE_TARGET,
    batch_neuron_scores,
    groups_to_keep,
    mlp_topk_step,
    topk_mask,
)
from polar_jax import validate
from polar_jax.errors import PolarJaxError
from routers.collect import Collected
from routers.model import ATTN_ACTIVATIONS, Routers

F32 = jnp.float32
MLP_NEG_WEIGHT_OFFSET = 0.005
ATTN_LOSSES = ("bce", "rank")
ATTN_BUDGETS = ("uniform", "adaptive")
# The local probe's weights (one per layer and group) train at this multiple of the learning
# rate: at the routers' own rate they were still learning after 10 epochs (tiny-opt, probe of
# 64, 2 epochs: recall 0.806 at 1x, 0.854 at 10x, 0.862 at 30x; docs/BENCHMARKS.md).
PROBE_LR_SCALE = 30


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Router training settings, checked on construction. `attn_rank`: None for the linear
    attention router, else the rank of the low-rank form (with `attn_activation`); `attn_loss`:
    "bce" on the top-k labels or "rank", pairwise on the groups' output norms; `attn_budget`:
    "uniform" (every layer keeps `attn_topk` of its groups) or "adaptive" (`routers.budget`);
    `attn_probe`: None, or the window (positions) of the attention router's local probe."""

    attn_topk: float = 0.5
    attn_budget: str = "uniform"
    attn_rank: int | None = None
    attn_activation: str = "relu"
    attn_loss: str = "bce"
    attn_probe: int | None = None
    mlp_rank: int = 1024
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    patience: int = 2
    seed: int = 0
    device_budget_bytes: int = 1 << 30  # training data held on the device at once

    def __post_init__(self):
        validate.number("attn_topk", self.attn_topk, low=0, high=1, low_open=True)
        validate.number("learning_rate", self.learning_rate, low=0, low_open=True)
        validate.number("weight_decay", self.weight_decay, low=0)
        for name in ("mlp_rank", "epochs", "batch_size", "patience", "device_budget_bytes"):
            validate.integer(name, getattr(self, name), low=1)
        validate.integer("seed", self.seed, low=0)
        for name in ("attn_rank", "attn_probe"):
            if getattr(self, name) is not None:
                validate.integer(name, getattr(self, name), low=1)
        validate.string("attn_activation", self.attn_activation, choices=tuple(ATTN_ACTIVATIONS))
        validate.string("attn_loss", self.attn_loss, choices=ATTN_LOSSES)
        validate.string("attn_budget", self.attn_budget, choices=ATTN_BUDGETS)


def check_batch_split(settings: TrainSettings, mesh: Mesh | None) -> None:
    """Refuses, in one line, a step batch that the mesh's `data` axis does not divide."""
    data = dp_size(mesh)
    if settings.batch_size % data:
        raise PolarJaxError(f"--batch-size {settings.batch_size} must be a multiple of --dp {data} "
                            "(each device trains on an equal share of every step)")


def _read(data: Collected, idx: np.ndarray) -> dict:
    """Host arrays of the records of tokens `idx`, read from the memmaps: u `[L, n, d]`
    (bfloat16), group_norm `[L, n, Hkv]`, active `[L, n, N / 8]` (packed bits), probe_norm
    `[L, n, Hkv]` (the last two where recorded)."""
    out = {"u": data.u[:, idx].view(jnp.bfloat16), "group_norm": data.group_norm[:, idx]}
    for name in ("active", "probe_norm"):
        if getattr(data, name) is not None:
            out[name] = getattr(data, name)[:, idx]
    return out


def _put(tree, sharding: NamedSharding | None):
    """The arrays of `tree` (the same on every process) on the default device, or placed by
    `sharding` on its mesh."""
    if sharding is None:
        return jax.device_put(tree)
    return jax.tree.map(lambda x: global_array(x, sharding), tree)


def _unpack(active, n: int):
    return jnp.unpackbits(active, axis=-1)[..., :n].astype(bool)


def _weighted_bce(logits, labels, neg_weight):
    """Mean over tokens and outputs of BCE with positives weighted 1, negatives `neg_weight`."""
    pos = -jax.nn.log_sigmoid(logits)
    neg = -jax.nn.log_sigmoid(-logits)
    per = jnp.where(labels, pos, neg_weight[:, None, None] * neg)
    return jnp.mean(per, axis=(1, 2))


def _pairwise_rank_loss(logits, group_norm):
    """Per layer, the mean over tokens of the pairwise logistic loss over the group pairs (i, j)
    with norm_i > norm_j, each pair weighted by (norm_i - norm_j) / the token's summed norms
    (misordering groups of near-equal norm costs little): logits, group_norm `[L, n, Hkv]`."""
    gap = group_norm[..., :, None] - group_norm[..., None, :]
    weight = jnp.maximum(gap, 0) / (jnp.sum(group_norm, axis=-1)[..., None, None] + 1e-9)
    margin = logits[..., :, None] - logits[..., None, :]
    return jnp.mean(jnp.sum(weight * -jax.nn.log_sigmoid(margin), axis=(-2, -1)), axis=1)


class _Trainer:
    """The routers' parameters and optimizer state (replicated over `mesh`, if any) and the
    jitted training pass and loss."""

    def __init__(self, routers: Routers, config: ModelConfig, settings: TrainSettings,
                 attn_groups: tuple[int, ...], mlp_neg_weight: np.ndarray | None,
                 mesh: Mesh | None = None):
        self.config = config
        self.attn_loss = settings.attn_loss
        # Host constants of the jitted loss (a closure may not hold arrays of other processes).
        self.k = np.asarray(attn_groups, np.int32)[:, None, None]  # [L, 1, 1]: per layer
        self.attn_neg_weight = np.asarray(attn_groups, np.float32) / config.num_kv_heads
        self.mlp_neg_weight = None if mlp_neg_weight is None else np.asarray(mlp_neg_weight, np.float32)
        self.whole_sharding = None if mesh is None else replicated(mesh)
        # Chunks `[L, steps, batch, ...]`: every step's tokens split over `data`.
        self.steps_sharding = None if mesh is None else NamedSharding(mesh, P(None, None, DATA))
        self.graphdef, params = nnx.split(routers)
        adamw = lambda lr: optax.adamw(lr, weight_decay=settings.weight_decay)
        labels = jax.tree_util.tree_map_with_path(  # the probe's weights at their own rate
            lambda path, _: "probe" if "probe_w" in jax.tree_util.keystr(path) else "router",
            params)
        self.optimizer = optax.multi_transform(
            {"router": adamw(settings.learning_rate),
             "probe": adamw(PROBE_LR_SCALE * settings.learning_rate)}, labels)
        self.params, self.opt_state = _put((params, self.optimizer.init(params)),
                                           self.whole_sharding)
        self._train_chunk = jax.jit(self._train_chunk_impl, donate_argnums=(0, 1),
                                    out_shardings=self.whole_sharding)
        self._loss = jax.jit(self._loss_impl, out_shardings=self.whole_sharding)

    def _loss_impl(self, params, batch):
        routers = nnx.merge(self.graphdef, params)
        u = batch["u"].astype(F32)  # routers train in float32; the data is stored in bf16
        logits = routers.attn_scores(u, batch.get("probe_norm"))
        if self.attn_loss == "rank":
            loss = _pairwise_rank_loss(logits, batch["group_norm"])
        else:
            labels = topk_mask(batch["group_norm"], self.k)
            loss = _weighted_bce(logits, labels, self.attn_neg_weight)
        if routers.has_mlp:
            active = _unpack(batch["active"], self.config.mlp_dim)
            loss = loss + _weighted_bce(routers.mlp_scores(u), active, self.mlp_neg_weight)
        return jnp.sum(loss)  # layers are independent: their losses add

    def _train_chunk_impl(self, params, opt_state, batches):
        """One pass over a chunk: `batches` `[L, steps, batch, ...]`, step i's tokens at index i
        of axis 1."""

        def step(carry, i):
            params, opt_state = carry
            batch = jax.tree.map(lambda a: a[:, i], batches)
            loss, grads = jax.value_and_grad(self._loss_impl)(params, batch)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        steps = jax.tree.leaves(batches)[0].shape[1]
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(steps))
        return params, opt_state, jnp.mean(losses)

    def epoch(self, data: Collected, settings: TrainSettings, rng: np.random.Generator) -> float:
        per_token = sum(a[:, :1].nbytes for a in (data.u, data.group_norm, data.active,
                                                   data.probe_norm) if a is not None)
        chunk = max(settings.batch_size, settings.device_budget_bytes // per_token)
        chunk -= chunk % settings.batch_size
        starts = rng.permutation(range(0, data.num_tokens, chunk))
        losses = []
        for start in starts:
            idx = np.arange(start, min(start + chunk, data.num_tokens))
            steps = len(idx) // settings.batch_size
            if steps == 0:
                continue
            order = rng.permutation(len(idx))[:steps * settings.batch_size]
            batches = {name: a[:, order].reshape(a.shape[0], steps, settings.batch_size, -1)
                       for name, a in _read(data, idx).items()}
            self.params, self.opt_state, loss = self._train_chunk(
                self.params, self.opt_state, _put(batches, self.steps_sharding))
            losses.append(float(to_host(loss)))
        return float(np.mean(losses))

    def heldout_loss(self, data: Collected, batch_size: int = 4096) -> float:
        total = 0.0
        for start in range(0, data.num_tokens, batch_size):
            idx = np.arange(start, min(start + batch_size, data.num_tokens))
            batch = _put(_read(data, idx), self.whole_sharding)
            total += float(to_host(self._loss(self.params, batch))) * len(idx)
        return total / data.num_tokens

    @property
    def routers(self) -> Routers:
        return nnx.merge(self.graphdef, self.params)


def mlp_positive_rate(data: Collected, n: int, max_tokens: int = 20000) -> np.ndarray:
    """Per layer, the fraction of (token, neuron) pairs that are active."""
    idx = np.arange(min(max_tokens, data.num_tokens))
    return np.asarray(jnp.mean(_unpack(jnp.asarray(data.active[:, idx]), n), axis=(1, 2)))


def uniform_groups(config: ModelConfig, attn_topk: float) -> tuple[int, ...]:
    """Every layer's KV groups kept at `attn_topk`: `groups_to_keep` of Hkv."""
    return (groups_to_keep(attn_topk, config.num_kv_heads),) * config.num_layers


def train(config: ModelConfig, train_data: Collected, calib_data: Collected,
          settings: TrainSettings, progress: bool = False, mesh: Mesh | None = None,
          attn_groups: tuple[int, ...] | None = None) -> tuple[Routers, list[dict]]:
    """Trains all layers' routers together; keeps the parameters of the epoch with the lowest
    loss on the calibration split, stopping after `patience` epochs without improvement. BCE
    labels: each layer's top `attn_groups[layer]` groups (default: `uniform_groups`). With a
    `mesh`, data parallel over its `data` axis; the routers return on the default device."""
    check_batch_split(settings, mesh)
    if train_data.num_tokens < settings.batch_size or calib_data.num_tokens < 1:
        raise PolarJaxError(
            f"router training needs at least batch_size ({settings.batch_size}) training tokens "
            f"and one held-out token, got {train_data.num_tokens} and {calib_data.num_tokens}")
    if (train_data.probe_norm is None) != (settings.attn_probe is None):
        raise ValueError("the collected data must hold probe norms exactly when "
                         "settings.attn_probe is set")
    routers = Routers.for_model(config, settings.mlp_rank, settings.seed, settings.attn_rank,
                                settings.attn_activation, settings.attn_probe)
    neg = None
    if routers.has_mlp:
        neg = mlp_positive_rate(train_data, config.mlp_dim) + MLP_NEG_WEIGHT_OFFSET
    trainer = _Trainer(routers, config, settings,
                       attn_groups or uniform_groups(config, settings.attn_topk), neg, mesh)
    rng = np.random.default_rng(settings.seed)
    # The first step donates the initial parameters: what is kept is a copy of a better epoch's.
    initial = best = trainer.heldout_loss(calib_data)
    history, best_params, waited = [], None, 0
    bar = tqdm(range(settings.epochs), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        train_loss = trainer.epoch(train_data, settings, rng)
        heldout = trainer.heldout_loss(calib_data)
        if not (math.isfinite(train_loss) and math.isfinite(heldout)):
            raise PolarJaxError(
                f"router training diverged at epoch {epoch + 1} (training loss {train_loss:.4g}, "
                f"held-out loss {heldout:.4g}); lower the learning rate "
                f"(now {settings.learning_rate:g})")
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "heldout_loss": heldout})
        bar.set_postfix(train=f"{train_loss:.4f}", heldout=f"{heldout:.4f}")
        if heldout < best:
            best, best_params, waited = heldout, jax.tree.map(jnp.copy, trainer.params), 0
        else:
            waited += 1
            if waited >= settings.patience:
                break
    if best_params is None:
        raise PolarJaxError(
            f"no epoch improved the held-out loss of the untrained routers ({initial:.4g}; the "
            f"best epoch reached {min(h['heldout_loss'] for h in history):.4g}); try another "
            f"learning rate (now {settings.learning_rate:g})")
    if mesh is not None:
        best_params = jax.tree.map(lambda x: jnp.asarray(to_host(x)), best_params)
    return nnx.merge(trainer.graphdef, best_params), history


@jax.jit
def _coverage(routers: Routers, u, active_packed):
    """For batches of tokens u `[L, nb, bs, d]`: per layer and k, how many of each batch's
    active neurons the top-k of `batch_neuron_scores` covers, summed over batches (`[L, N]`),
    and the summed union sizes `[L]`."""
    scores = batch_neuron_scores(routers.mlp_scores(u), axis=2)  # [L, nb, N]
    union = jnp.any(_unpack(active_packed, scores.shape[-1]), axis=2)  # [L, nb, N]
    order = jnp.argsort(-scores, axis=-1)
    covered = jnp.cumsum(jnp.take_along_axis(union, order, axis=-1), axis=-1)
    return jnp.sum(covered, axis=1), jnp.sum(union, axis=(1, 2))


def calibrate_mlp_topk(routers: Routers, config: ModelConfig, data: Collected,
                       batch_sizes=CALIBRATION_BATCH_SIZES, tokens_per_size: int = 4096,
                       seed: int = 0, progress: bool = False) -> dict[int, list[int]]:
    """Batch size -> per layer, the smallest k (a multiple of `mlp_topk_step`, capped at N) whose
    top-k of the batch's `batch_neuron_scores` covers >= 99% of the batch's true active union,
    pooled over random batches (at least 32, about `tokens_per_size` tokens in all) drawn from
    `data`, the calibration split."""
    n, step = config.mlp_dim, mlp_topk_step(config.mlp_dim)
    grid = np.minimum(np.arange(step, n + step, step), n)
    rng = np.random.default_rng(seed)
    table = {}
    for batch_size in tqdm(batch_sizes, desc="calibrate", unit="size", disable=not progress):
        num_batches = max(32, tokens_per_size // batch_size)
        per_call = max(1, tokens_per_size // batch_size)
        covered = np.zeros((config.num_layers, n))
        union = np.zeros(config.num_layers)
        for first in range(0, num_batches, per_call):
            nb = min(per_call, num_batches - first)
            idx = np.stack([rng.choice(data.num_tokens, batch_size, replace=batch_size > data.num_tokens)
                            for _ in range(nb)])
            batch = _read(data, idx.ravel())
            shape = lambda a: a.reshape(a.shape[0], nb, batch_size, *a.shape[2:])
            c, u = _coverage(routers, shape(batch["u"]), shape(batch["active"]))
            covered += np.asarray(c)
            union += np.asarray(u)
        coverage = covered / np.maximum(union, 1)[:, None]  # [L, N]: coverage of top-(i+1)
        ok = coverage[:, grid - 1] >= COVERAGE_TARGET
        table[batch_size] = [int(grid[np.argmax(row)]) if row.any() else n for row in ok]
    return table


def evaluate(routers: Routers, config: ModelConfig, data: Collected,
             attn_groups: tuple[int, ...], mlp_topk_batch1: list[int] | None,
             batch_size: int = 4096, tokens: range | None = None) -> dict:
    """Held-out recall per layer over the `tokens` of `data` (default: all): of the oracle
    top-k groups by the router's top-k (k = `attn_groups[layer]`), and (MLP) of the active
    neurons by the router's top-k at the batch-1 calibrated k."""
    k = np.asarray(attn_groups, np.int32)[:, None, None]
    L, n = config.num_layers, config.mlp_dim

    @jax.jit
    def hits(batch):
        router_top = topk_mask(routers.attn_scores(batch["u"], batch.get("probe_norm")), k)
        oracle_top = topk_mask(batch["group_norm"], k)
        out = {"attn": jnp.sum(router_top & oracle_top, axis=(1, 2))}
        if mlp_topk_batch1 is not None:
            active = _unpack(batch["active"], n)
            scores = batch_neuron_scores(routers.mlp_scores(batch["u"])[:, :, None], axis=2)
            # the set of the ranks below k (ties to the lowest indices), without sorting
            # (19.8 -> 2.6 s on tiny-opt's held-out tokens, 2 CPU cores)
            kept = topk_mask(scores, jnp.asarray(mlp_topk_batch1)[:, None, None])
            out["mlp_hit"] = jnp.sum(kept & active, axis=(1, 2))
            out["mlp_active"] = jnp.sum(active, axis=(1, 2))
        return out

    totals: dict[str, np.ndarray] = {}
    tokens = range(data.num_tokens) if tokens is None else tokens
    for start in range(tokens.start, tokens.stop, batch_size):
        idx = np.arange(start, min(start + batch_size, tokens.stop))
        for key, value in hits(_read(data, idx)).items():
            totals[key] = totals.get(key, 0) + np.asarray(value, np.float64)
    attn = totals["attn"] / (k[:, 0, 0] * len(tokens))
    result = {"attn_recall_per_layer": attn.round(4).tolist(),
              "attn_recall_mean": float(attn[1:].mean() if L > 1 else attn.mean())}
    if mlp_topk_batch1 is not None:
        mlp = totals["mlp_hit"] / np.maximum(totals["mlp_active"], 1)
        result["mlp_recall_per_layer"] = mlp.round(4).tolist()
        result["mlp_recall_mean"] = float(mlp[1:].mean() if L > 1 else mlp.mean())
    else:
        result["mlp_recall_per_layer"] = None
        result["mlp_recall_mean"] = None
    return result
