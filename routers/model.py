"""Router modules, all layers stacked on a leading layer axis so one jitted step trains them
all, plus saving and loading with a check that the routers belong to the model.

- attention router (every model), one score per KV group: `Linear(d, Hkv)` with bias (the
  linear form), or with `attn_rank` r_a the low-rank form `Linear(d, r_a) -> ReLU or SiLU ->
  Linear(r_a, Hkv)`, both with bias; with `attn_probe` W (either form), each group's score
  also adds `probe_w[g] * log(|o_W[g]| + eps)` (`models.ops.probe_logits`), where o_W is the
  group's attention output over only the last W positions (the "local probe": a window of the
  cache read for every group, W / context of a dense attention's reads);
- MLP router (models whose MLP is not gated): `Linear(d, r) -> Linear(r, N)`, no bias and no
  activation between (the original's low-rank predictor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import ModelConfig, build_model
from models.layers import Matmul, xla_matmul
from models.ops import probe_logits
from pallas_kernels.neuron_scores import quantize_rows
from polar_jax import validate
from polar_jax.errors import PolarJaxError
from polar_jax.files import atomic_output, checkpoint_file, restore_arrays, save_arrays

F32 = jnp.float32
FORMAT_VERSION = 1
METADATA_FILE = "routers.json"
PARAMS_DIR = "params"
ATTN_ACTIVATIONS = {"relu": jax.nn.relu, "silu": jax.nn.silu}  # the low-rank attention router's


def _uniform(key, shape, fan_in):
    """PyTorch's `nn.Linear` initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, F32, -bound, bound)


def attn_group_logits(z, hidden_b, up, b, activation: str):
    """The attention router's group logits `[..., Hkv]` float32 from its input projection z
    `[..., Hkv]` (linear form: `up` and `hidden_b` None) or `[..., r_a]` (low-rank form:
    `activation(z + hidden_b) @ up`, up `[r_a, Hkv]`), plus the bias b `[Hkv]`."""
    if up is None:
        return z.astype(F32) + b
    h = ATTN_ACTIVATIONS[activation](z.astype(F32) + hidden_b)
    return jnp.einsum("...r,rh->...h", h, up.astype(F32), preferred_element_type=F32) + b


class Routers(nnx.Module):
    """Every layer's routers; params `attn_w [L, d, Hkv]` (linear form) or `[L, d, r_a]`
    (low-rank form, with `attn_hidden_b [L, r_a]` and `attn_up [L, r_a, Hkv]`), `attn_b
    [L, Hkv]`, with a local probe of `attn_probe` positions `probe_w [L, Hkv]`, `mlp_down
    [L, d, r]`, `mlp_up [L, r, N]` (the last two only for non-gated MLPs)."""

    def __init__(self, num_layers: int, d: int, num_groups: int, mlp_dim: int | None,
                 mlp_rank: int, key, attn_rank: int | None = None, attn_activation: str = "relu",
                 attn_probe: int | None = None):
        keys = jax.random.split(key, 4)
        if attn_activation not in ATTN_ACTIVATIONS:
            raise PolarJaxError(f"unknown attention router activation {attn_activation!r}; "
                                f"choose {' or '.join(ATTN_ACTIVATIONS)}")
        self.attn_activation = attn_activation
        self.attn_probe = attn_probe
        # starts at 1: a group scores the log of its local output norm, plus the router
        self.probe_w = nnx.Param(jnp.ones((num_layers, num_groups), F32)) if attn_probe else None
        self.attn_w = nnx.Param(_uniform(keys[0], (num_layers, d, attn_rank or num_groups), d))
        hidden_key, up_key = jax.random.split(jax.random.fold_in(key, 1))
        self.attn_hidden_b = nnx.Param(_uniform(hidden_key, (num_layers, attn_rank), d)) if attn_rank else None
        self.attn_up = (nnx.Param(_uniform(up_key, (num_layers, attn_rank, num_groups), attn_rank))
                        if attn_rank else None)
        self.attn_b = nnx.Param(_uniform(keys[1], (num_layers, num_groups), attn_rank or d))
        self.mlp_down = nnx.Param(_uniform(keys[2], (num_layers, d, mlp_rank), d)) if mlp_dim else None
        self.mlp_up = (nnx.Param(_uniform(keys[3], (num_layers, mlp_rank, mlp_dim), mlp_rank))
                       if mlp_dim else None)

    @classmethod
    def for_model(cls, config: ModelConfig, mlp_rank: int = 1024, seed: int = 0,
                  attn_rank: int | None = None, attn_activation: str = "relu",
                  attn_probe: int | None = None) -> "Routers":
        """`attn_rank` None: the linear attention router; else the low-rank form of that rank.
        `attn_probe` W: with the local probe over the last W positions."""
        mlp_dim = None if config.gated_mlp else config.mlp_dim
        return cls(config.num_layers, config.hidden_size, config.num_kv_heads, mlp_dim,
                   min(mlp_rank, config.hidden_size), jax.random.key(seed), attn_rank,
                   attn_activation, attn_probe)

    @property
    def has_mlp(self) -> bool:
        return self.mlp_down is not None

    def attn_scores(self, u, probe_norm=None, layer: int | None = None):
        """Group logits: u `[L, ..., d]` -> `[L, ..., Hkv]`, or for one `layer`, `[..., d]` ->
        `[..., Hkv]`; with a local probe, its term is added where its group norms `probe_norm
        [L, ..., Hkv]` are given (else the logits are those before it), as `LayerRouters.scores`."""
        if layer is not None:
            return self.layer(layer).scores(u, probe_norm)[0]
        param = lambda p: None if p is None else p[...]
        z = jnp.einsum("l...d,ldh->l...h", u, self.attn_w[...].astype(u.dtype),
                       preferred_element_type=F32)
        logits = lambda z, hidden_b, up, b: attn_group_logits(z, hidden_b, up, b,
                                                              self.attn_activation)
        logits = jax.vmap(logits)(z, param(self.attn_hidden_b), param(self.attn_up),
                                  self.attn_b[...])
        if self.probe_w is None or probe_norm is None:
            return logits
        probe_w = self.probe_w[...].reshape(self.probe_w.shape[0], *[1] * (u.ndim - 2), -1)
        return probe_logits(logits, probe_w, probe_norm)

    def mlp_scores(self, u, layer: int | None = None):
        """Neuron logits: u `[L, ..., d]` -> `[L, ..., N]`, or for one `layer`, `[..., d]` -> `[..., N]`."""
        if layer is not None:
            return self.layer(layer).scores(u)[1]
        down, up = self.mlp_down[...], self.mlp_up[...]
        h = jnp.einsum("l...d,ldr->l...r", u, down.astype(u.dtype), preferred_element_type=F32)
        return jnp.einsum("l...r,lrn->l...n", h.astype(u.dtype), up.astype(u.dtype),
                          preferred_element_type=F32)

    def layer(self, i: int) -> "LayerRouters":
        """Layer `i`'s routers, the attention router and the MLP router's first projection
        side by side in one matrix (they read the same input)."""
        w = self.attn_w[i]
        if self.mlp_down is not None:
            w = jnp.concatenate([w, self.mlp_down[i]], axis=1)
        low_rank = self.attn_up is not None
        return LayerRouters(w, self.attn_b[i], None if self.mlp_up is None else self.mlp_up[i].T,
                            attn_hidden_b=self.attn_hidden_b[i] if low_rank else None,
                            attn_up=self.attn_up[i] if low_rank else None,
                            attn_activation=self.attn_activation,
                            probe_w=None if self.probe_w is None else self.probe_w[i],
                            probe_window=self.attn_probe)

    def check_int8_mlp_up(self) -> None:
        """Refuses int8 router weights for routers without an MLP router (gated MLPs)."""
        if not self.has_mlp:
            raise PolarJaxError("int8 router weights apply to the MLP router's second projection; "
                                "these routers have no MLP router (the model's MLP is gated)")

    def unstack(self, dtype=None, int8_mlp_up: bool = False) -> tuple["LayerRouters", ...]:
        """Every layer's routers as separate arrays (in `dtype`), made once outside any jit: for
        decoding, where slicing the stacked params inside the loop copies each layer's weights
        every step (measured: 23 us per layer and step for a rank-1024 router of opt-6.7b).
        `int8_mlp_up`: the MLP router's second projection as int8 rows with a float32 scale per
        neuron (`quantize_rows`, from the float32 params), half the bytes of bfloat16."""
        if int8_mlp_up:
            self.check_int8_mlp_up()
        cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))

        def one(i: int) -> LayerRouters:
            layer = self.layer(i)
            up, scale = layer.mlp_up, None
            if int8_mlp_up:
                up, scale = quantize_rows(up)
            elif up is not None:
                up = cast(up)
            low_rank = layer.attn_up is not None
            return jax.tree.map(jnp.copy, dataclasses.replace(
                layer, w_in=cast(layer.w_in), attn_b=cast(layer.attn_b), mlp_up=up,
                mlp_up_scale=scale, attn_hidden_b=cast(layer.attn_hidden_b) if low_rank else None,
                attn_up=cast(layer.attn_up) if low_rank else None))  # probe_w stays float32

        return tuple(one(i) for i in range(self.attn_w.shape[0]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerRouters:
    """One layer's routers: `w_in [d, w + r]` (the attention router's input projection, w = Hkv
    columns for the linear form or r_a for the low-rank one, then the MLP router's first
    projection; r = 0 for gated MLPs), `attn_b [Hkv]`, `mlp_up [N, r]` (the second projection,
    neuron-major as the `neuron_scores` kernel reads it; None for gated MLPs) and, where
    `mlp_up` is int8, `mlp_up_scale [N]` float32 (neuron n's weights are `mlp_up[n] *
    mlp_up_scale[n]`); the low-rank attention router's `attn_hidden_b [r_a]`, `attn_up
    [r_a, Hkv]` and `attn_activation` (None, None for the linear form); the local probe's
    `probe_w [Hkv]` float32 and its window `probe_window` (None, None without a probe)."""

    w_in: jax.Array
    attn_b: jax.Array
    mlp_up: jax.Array | None
    mlp_up_scale: jax.Array | None = None
    attn_hidden_b: jax.Array | None = None
    attn_up: jax.Array | None = None
    attn_activation: str = dataclasses.field(default="relu", metadata=dict(static=True))
    probe_w: jax.Array | None = None
    probe_window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def project(self, u, matmul: Matmul = xla_matmul):
        """(group logits `[..., Hkv]` float32, the MLP router's hidden state `[..., r]` in u's
        dtype or None) of u `[..., d]`: one `matmul` for both routers' first projections."""
        z = matmul(u, self.w_in.astype(u.dtype))
        width = self.attn_b.shape[0] if self.attn_up is None else self.attn_up.shape[0]
        hidden = None if self.mlp_up is None else z[..., width:].astype(u.dtype)
        return attn_group_logits(z[..., :width], self.attn_hidden_b, self.attn_up, self.attn_b,
                                 self.attn_activation), hidden

    def neuron_logits(self, hidden):
        """Neuron logits `[..., N]` float32 of the hidden state `[..., r]`: the second projection
        in hidden's dtype (int8 rows converted exactly), summed in float32, times the scale as
        the `neuron_scores` kernel computes them."""
        logits = jnp.einsum("...r,nr->...n", hidden, self.mlp_up.astype(hidden.dtype),
                            preferred_element_type=F32)
        return logits if self.mlp_up_scale is None else logits * self.mlp_up_scale

    def with_probe(self, group_logits, probe_norm):
        """The group logits with the local probe's term added (unchanged without a probe)."""
        if self.probe_w is None:
            return group_logits
        return probe_logits(group_logits, self.probe_w, probe_norm)

    def scores(self, u, probe_norm=None):
        """(group logits `[..., Hkv]`, neuron logits `[..., N]` or None), float32, of u `[..., d]`;
        with a local probe, its term is added where its group norms `probe_norm [..., Hkv]`
        are given (else the logits are those before it)."""
        groups, hidden = self.project(u)
        if probe_norm is not None:
            groups = self.with_probe(groups, probe_norm)
        return groups, None if hidden is None else self.neuron_logits(hidden)


def model_fingerprint(config: ModelConfig) -> dict:
    """What a routers directory records about its model: type, sizes, and a hash of the shapes
    of every parameter (so routers never load onto a model they were not trained for)."""
    shapes = nnx.to_pure_dict(nnx.split(build_model(config))[1])
    flat = sorted((jax.tree_util.keystr(path), list(leaf.shape))
                  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0])
    digest = hashlib.sha256(json.dumps(flat).encode()).hexdigest()[:16]
    return {"model_type": config.model_type, "num_layers": config.num_layers,
            "hidden_size": config.hidden_size, "num_kv_heads": config.num_kv_heads,
            "mlp_dim": config.mlp_dim, "shape_hash": digest}


def write_routers(routers: Routers, metadata: dict, directory: Path) -> None:
    """Writes params (orbax, in `params/`) and `routers.json` into the existing `directory`."""
    save_arrays(directory / PARAMS_DIR, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(routers))))
    (directory / METADATA_FILE).write_text(json.dumps(dict(metadata, format=FORMAT_VERSION), indent=2) + "\n")


def save_routers(routers: Routers, metadata: dict, out: str | Path, *, force: bool = False,
                 inputs: Mapping[str, str | Path | None] | None = None) -> Path:
    """Saves to `out` through `polar_jax.files.atomic_output`: refused when `out` exists
    (unless `force`) or overlaps one of `inputs` ({role: path}); nothing partial on failure."""
    with atomic_output(out, force=force, inputs=inputs) as staging:
        write_routers(routers, metadata, staging.path)
    return Path(out)


def _checked_metadata(metadata: object, meta_file: Path) -> dict:
    """`metadata` (routers.json) with every key that loading and decoding read checked, each
    refusal naming the file and the key: format, model fingerprint, mlp_rank, attn_topk and
    the mlp_topk table (batch-size strings -> per layer, a k in [1, N]), and the low-rank
    attention router's attn_rank and attn_activation, the local probe's window attn_probe and
    the per-layer attention budget attn_groups_per_layer (a k in [1, Hkv] per layer) where
    given."""
    validate.mapping(str(meta_file), metadata)
    if metadata.get("format") != FORMAT_VERSION:
        raise PolarJaxError(
            f"{meta_file} holds routers format {metadata.get('format')!r}; this version reads "
            f"format {FORMAT_VERSION}: train the routers again")

    def field(key: str) -> tuple[str, object]:
        """(the key named for messages, its value)."""
        if key not in metadata:
            raise PolarJaxError(f"{meta_file} has no {key!r}: train the routers again")
        return f"{meta_file}: {key!r}", metadata[key]

    name, model = field("model")
    validate.mapping(name, model)
    num_layers, mlp_dim = (validate.integer(f"{name}[{key!r}]", model.get(key), low=1)
                           for key in ("num_layers", "mlp_dim"))
    validate.integer(*field("mlp_rank"), low=1)
    if metadata.get("attn_probe") is not None:  # absent: no local probe
        validate.integer(f"{meta_file}: 'attn_probe'", metadata["attn_probe"], low=1)
    if metadata.get("attn_rank") is not None:  # absent: the linear attention router
        validate.integer(f"{meta_file}: 'attn_rank'", metadata["attn_rank"], low=1)
        validate.string(f"{meta_file}: 'attn_activation'", metadata.get("attn_activation"),
                        choices=tuple(ATTN_ACTIVATIONS))
    validate.number(*field("attn_topk"), low=0, high=1, low_open=True)
    budget = metadata.get("attn_groups_per_layer")  # absent or None: a uniform budget
    if budget is not None:
        for layer, k in enumerate(validate.listing(f"{meta_file}: 'attn_groups_per_layer'",
                                                   budget, num_layers)):
            validate.integer(f"{meta_file}: 'attn_groups_per_layer'[{layer}]", k, low=1,
                             high=model.get("num_kv_heads"))
    name, table = field("mlp_topk")
    if table is not None:
        if not validate.mapping(name, table):
            raise PolarJaxError(f"{name} must be null or map at least one batch size, got {{}}")
        for size, ks in table.items():
            if not (size.isdecimal() and size == str(int(size)) and int(size) >= 1):
                raise PolarJaxError(f"{name} has batch size {size!r}; batch sizes must be positive "
                                    "integers written in decimal")
            for layer, k in enumerate(validate.listing(f"{name}[{size!r}]", ks, num_layers)):
                validate.integer(f"{name}[{size!r}][{layer}]", k, low=1, high=mlp_dim)
    return metadata


def read_metadata(path: str | Path) -> dict:
    """The checked `routers.json` of the routers directory `path`."""
    meta_file = Path(path) / METADATA_FILE
    if not os.path.lexists(meta_file):
        raise PolarJaxError(f"{path} is not a routers directory (no {METADATA_FILE})")
    checkpoint_file(Path(path), METADATA_FILE)
    try:
        metadata = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PolarJaxError(f"{meta_file} is not readable JSON: {err}") from None
    return _checked_metadata(metadata, meta_file)


def load_routers(path: str | Path, config: ModelConfig) -> tuple[Routers, dict]:
    """(routers, metadata) from `path`, refusing routers trained for another model."""
    metadata = read_metadata(path)
    expected, found = model_fingerprint(config), metadata["model"]
    if found != expected:
        raise PolarJaxError(
            f"the routers in {path} belong to another model: they were trained for {found}, "
            f"but this model is {expected}"
        )
    abstract = nnx.eval_shape(lambda: Routers.for_model(
        config, metadata["mlp_rank"], attn_rank=metadata.get("attn_rank"),
        attn_activation=metadata.get("attn_activation", "relu"),
        attn_probe=metadata.get("attn_probe")))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restore_arrays(Path(path), PARAMS_DIR, target))
    return nnx.merge(graphdef, state), metadata
