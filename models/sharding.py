"""Sharding over a device mesh of two axes, `data` (the batch) and `model` (tensor parallel),
and the one table from the logical axes of parameters and caches to mesh axes.

Tensor parallelism splits attention by KV group (a group's query heads, key and value travel
together: `w_qkv [d, Hkv, G + 2, D]`), the output projection by query head (row-parallel),
the MLP by neuron (rows of `w_in` / `w_gate_up` and `w_out`), the vocabulary of the token
embedding and the head, and the KV cache by KV group; norms, biases of the residual stream,
learned positions and OPT's embedding projections are replicated. XLA inserts the two
all-reduces a layer (after the output projection and after the MLP); the Pallas kernels run
per shard inside `shard_map` (`models.ops`). Lives in `models` so that the ops and the
models' callers share one spelling of the mesh axes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from polar_jax import validate
from polar_jax.errors import PolarJaxError

DATA, MODEL = "data", "model"

# Logical axis -> mesh axis (None: replicated).
RULES: dict[str, str | None] = {
    "batch": DATA,
    "kv_heads": MODEL,
    "heads": MODEL,
    "neurons": MODEL,
    "vocab": MODEL,
    "embed": None,
    "seq": None,
    "pages": None,  # a paged cache's pool: any sequence's page may sit anywhere
    "page": None,
    "pages_per_seq": None,
    "head_dim": None,
    "qkv": None,  # a group's G query heads, its key and its value
    "gate_up": None,
    "positions": None,
    "router_out": None,  # the routers' shared first projection: group logits, low-rank state
    "rank": None,
}

# A parameter's logical axes, by its path in the model's state (the module's attribute name,
# then the parameter's), for the parameters the families share; a family's own (OPT's learned
# positions and embedding projections) are in its registry record (`Family.param_axes`).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "w_qkv": ("embed", "kv_heads", "qkv", "head_dim"),
    "b_qkv": ("kv_heads", "qkv", "head_dim"),
    "w_o": ("heads", "head_dim", "embed"),
    "b_o": ("embed",),
    "w_in": ("neurons", "embed"),
    "b_in": ("neurons",),
    "w_gate_up": ("neurons", "gate_up", "embed"),
    "b_gate_up": ("neurons", "gate_up"),
    "w_out": ("neurons", "embed"),
    "b_out": ("embed",),
    "embedding": ("vocab", "embed"),
    "pos_embed/embedding": ("positions", "embed"),
    "weight": ("embed",),  # norms
    "bias": ("embed",),
}
# One layer's routers (`routers.model.LayerRouters`): only the neuron-major second projection
# of the MLP router (and its int8 scales) splits, with the neurons it scores.
ROUTER_AXES: dict[str, tuple[str, ...]] = {
    "w_in": ("embed", "router_out"),
    "attn_b": ("router_out",),
    "attn_hidden_b": ("router_out",),
    "attn_up": ("rank", "router_out"),
    "mlp_up": ("neurons", "rank"),
    "mlp_up_scale": ("neurons",),
    "probe_w": ("kv_heads",),  # a local probe weight per KV group: split with the groups
}
KV_CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")  # = models.kv_cache.KVCache.AXES
# `models.kv_cache.PagedKVCache`'s leaves, by field: the pools split by KV group, like the
# contiguous cache; the block table by sequence.
# Page summaries (page sparsity) split with the pages' KV groups.
PAGED_KV_CACHE_AXES = {"pages": ("kv_heads", "pages", "page", "head_dim"),
                       "block_table": ("batch", "pages_per_seq"),
                       "summaries": ("kv_heads", "pages", "head_dim")}


def make_mesh(tp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A `data` x `model` mesh of dp x tp devices (default: the first dp x tp of
    `jax.devices()`, which spans every process in a multi-process run)."""
    tp = validate.integer("--tp", tp, low=1)
    dp = validate.integer("--dp", dp, low=1)
    devices = jax.devices() if devices is None else list(devices)
    if tp * dp > len(devices):
        raise PolarJaxError(f"--tp {tp} x --dp {dp} needs {tp * dp} devices; "
                            f"{len(devices)} are visible ({devices[0].platform})")
    if jax.process_count() > 1 and tp * dp != len(devices):
        raise PolarJaxError(f"with {jax.process_count()} processes the mesh must use every one "
                            f"of the {len(devices)} devices; got --tp {tp} x --dp {dp}")
    return Mesh(np.asarray(devices[:tp * dp]).reshape(dp, tp), (DATA, MODEL))


def tp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[MODEL]


def dp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[DATA]


def check_split(config, mesh: Mesh) -> None:
    """Refuses, in one line, a tensor-parallel size that does not divide the model's KV groups
    (its query heads follow them) and its MLP neurons, naming the sizes that do."""
    tp, groups, neurons = tp_size(mesh), config.num_kv_heads, config.mlp_dim
    if groups % tp or neurons % tp:
        fits = [n for n in range(1, groups + 1) if groups % n == 0 and neurons % n == 0]
        raise PolarJaxError(f"--tp {tp} must divide the model's {groups} KV groups and {neurons} "
                            f"MLP neurons; choose --tp from {', '.join(map(str, fits))}")


def spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of logical `axes` for an array of `shape`: each axis mapped by
    `RULES`, replicated where the mesh axis does not divide it (e.g. an odd vocabulary) or is
    already used by an earlier axis."""
    used, out = set(), []
    for axis, size in zip(axes, shape):
        mesh_axis = RULES[axis]
        if mesh_axis is None or mesh_axis in used or size % mesh.shape[mesh_axis]:
            out.append(None)
        else:
            used.add(mesh_axis)
            out.append(mesh_axis)
    return PartitionSpec(*out)


def param_axes(path: tuple) -> tuple[str, ...]:
    """The logical axes of the parameter at `path` (its keys in the model's state)."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    names = [n for n in names if n != "value"]
    # Imported here: the registry imports the family modules, which import this one.
    from models.registry import FAMILY_PARAM_AXES

    for key in ("/".join(names[-2:]), names[-1]):
        for table in (FAMILY_PARAM_AXES, PARAM_AXES):
            if key in table:
                return table[key]
    raise KeyError(f"no sharding rule for parameter {'/'.join(names)}")


def param_shardings(state, mesh: Mesh):
    """A `NamedSharding` for every leaf of `state` (a model state or its abstract shapes)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec(param_axes(path), x.shape, mesh)), state)


def router_shardings(router_state, mesh: Mesh):
    """A `NamedSharding` for every leaf of `Routers.unstack()`'s per-layer routers."""
    def one(path, x):
        name = str(getattr(path[-1], "name", getattr(path[-1], "key", path[-1])))
        return NamedSharding(mesh, spec(ROUTER_AXES[name], x.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, router_state)


def kv_cache_shardings(kv_cache, mesh: Mesh):
    """A `NamedSharding` for every array of a `KVCache` or `PagedKVCache` (concrete or
    abstract)."""
    def one(path, x):
        axes = PAGED_KV_CACHE_AXES.get(getattr(path[0], "name", None), KV_CACHE_AXES)
        return NamedSharding(mesh, spec(axes, x.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, kv_cache)


def layer_kv_specs(layer_kv, mesh: Mesh):
    """The PartitionSpecs of a per-layer cache view (`LayerKV`, `PagedLayerKV`), field by
    field, as `shard_map` takes them: the placement `kv_cache_shardings` gives (an absent
    field, a paged view's summaries without page sparsity, stays None)."""
    return type(layer_kv)(**{name: spec(axes, getattr(layer_kv, name).shape, mesh)
                             for name, axes in layer_kv.AXES.items()
                             if getattr(layer_kv, name) is not None})


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Arrays whose leading axis is the batch: split over `data`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_array(value, sharding: NamedSharding) -> jax.Array:
    """The host array `value` (the same on every process) as one array placed by `sharding`,
    each process supplying only its own devices' pieces."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated or fully addressable array's value on this host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if not x.sharding.is_fully_replicated:
        raise ValueError("to_host needs a replicated array in a multi-process run")
    return np.asarray(x.addressable_data(0))
