"""Collecting router training data: run the dense model over text and record, per layer and
per token, the router input and the labels.

- `u`: the layer's attention input (output of its first norm), stored as bfloat16 bits;
- `group_norm`: for each KV group, the L2 norm over the group's query heads of their attention
  outputs before the output projection (for MHA a group is one head), float32;
- `active` (models whose MLP is not gated): neuron n's activation output > 0, packed 8 per byte;
- `probe_norm` (with a local probe of W positions): `group_norm` of the attention over only
  the last W positions (within the model's own window, if any), float32.

Arrays are `[num_layers, num_tokens, ...]` `.npy` memmaps filled window batch by window batch,
so host memory stays bounded by one batch whatever the text length. Over a mesh, each batch's
windows are split over `data` (the model is split over `model` already) and the records come
back replicated, so every process stores them all.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from models import ModelConfig
from models.layers import positions_from_mask
from models.ops import NO_RECORD, DenseOps, group_output_energy, probe_norm
from models.sharding import batch_sharding, dp_size, global_array, replicated, to_host
from polar_jax.windows import stream_windows


@dataclasses.dataclass(frozen=True)
class RecordingOps(DenseOps):
    """Dense execution whose records are each layer's router input and labels: `u`, the
    `group_norm` of each KV group's attention outputs, (`probe_window` W) the `probe_norm` of
    the attention over the last W positions and (`record_mlp`) the `active` neurons, packed 8
    per byte. The route is u itself, handed to the attention to record."""

    num_kv_heads: int
    record_mlp: bool
    probe_window: int | None = None

    def route(self, *, layer, u):
        return u

    def attention(self, *, layer, route, q, k, v, kv, window, logit_softcap):
        o, kv, _ = super().attention(layer=layer, route=route, q=q, k=k, v=v, kv=kv, window=window,
                                     logit_softcap=logit_softcap)
        record = {"u": route, "group_norm": jnp.sqrt(group_output_energy(o, self.num_kv_heads))}
        if self.probe_window is not None:
            record["probe_norm"] = probe_norm(q, k, v, self.key_valid, window, logit_softcap,
                                              self.probe_window)
        return o, kv, record

    def mlp(self, *, layer, route, x, mlp):
        h = mlp.activations(x)
        record = {"active": jnp.packbits(h > 0, axis=-1)} if self.record_mlp else NO_RECORD
        return mlp.project_out(h, x.dtype), record


@dataclasses.dataclass(frozen=True)
class Collected:
    """Memmapped router data in `directory`: u, group_norm, active (or None), probe_norm (or
    None)."""

    directory: Path
    u: np.ndarray  # [L, T, d] uint16 (bfloat16 bits)
    group_norm: np.ndarray  # [L, T, Hkv] float32
    active: np.ndarray | None  # [L, T, ceil(N / 8)] uint8
    probe_norm: np.ndarray | None = None  # [L, T, Hkv] float32

    @property
    def num_tokens(self) -> int:
        return self.u.shape[1]

    @classmethod
    def open(cls, directory: Path) -> "Collected":
        optional = lambda name: (np.load(directory / name, mmap_mode="r")
                                 if (directory / name).exists() else None)
        return cls(directory, np.load(directory / "u.npy", mmap_mode="r"),
                   np.load(directory / "group_norm.npy", mmap_mode="r"),
                   optional("active.npy"), optional("probe_norm.npy"))


def _record_fn(model, config: ModelConfig, record_mlp: bool, probe_window: int | None,
               mesh: Mesh | None):
    """A jitted `(tokens, mask) [B, T] -> records` on the host, `[L, B, T, ...]` each. With a
    `mesh`, the windows are split over `data` and the records gathered, replicated."""
    graphdef, state = nnx.split(model)
    place, out_shardings = (lambda x: x), None
    if mesh is not None:
        rows, out_shardings = batch_sharding(mesh, 2), replicated(mesh)
        place = lambda x: global_array(x, rows)

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def record(state, tokens, mask):
        model = nnx.merge(graphdef, state)
        ops = RecordingOps(mask, config.num_kv_heads, record_mlp, probe_window)
        records = model.forward(tokens, positions_from_mask(mask), ops).records
        stack = lambda key: jnp.stack([record[key] for record in records])
        out = {key: stack(key) for key in records[0] if key != "u"}
        out["u"] = jax.lax.bitcast_convert_type(stack("u").astype(jnp.bfloat16), jnp.uint16)
        return out

    return lambda tokens, mask: jax.tree.map(to_host, record(state, place(tokens), place(mask)))


def collect(model, config: ModelConfig, ids: np.ndarray | list[np.ndarray], directory: Path,
            seq_len: int = 512, batch_size: int = 8, progress: bool = False,
            mesh: Mesh | None = None, probe_window: int | None = None) -> Collected:
    """Runs the model over `ids` (one token stream, or several, each cut into its own windows
    and stored one after the other) in windows of `seq_len` and stores every token's records
    (with `probe_window`, the local probe's too).
    With a `mesh` (the model loaded onto it), each batch of windows (rounded up to a multiple
    of the `data` size) is split over `data`."""
    directory.mkdir(parents=True, exist_ok=True)
    record_mlp = not config.gated_mlp
    tokens, mask = stream_windows(ids, seq_len)
    data = dp_size(mesh)
    batch_size = -(-batch_size // data) * data
    total = int(mask.sum())
    L = config.num_layers
    files = {
        "u": ((L, total, config.hidden_size), np.uint16),
        "group_norm": ((L, total, config.num_kv_heads), np.float32),
    }
    if record_mlp:
        files["active"] = ((L, total, -(-config.mlp_dim // 8)), np.uint8)
    if probe_window is not None:
        files["probe_norm"] = ((L, total, config.num_kv_heads), np.float32)
    arrays = {name: np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype,
                                              shape=shape)
              for name, (shape, dtype) in files.items()}
    record = _record_fn(model, config, record_mlp, probe_window, mesh)
    offset = 0
    for start in tqdm(range(0, len(tokens), batch_size), desc="collect", unit="batch",
                      disable=not progress):
        batch_tokens, batch_mask = tokens[start:start + batch_size], mask[start:start + batch_size]
        rows = len(batch_tokens)
        if rows < batch_size:  # one compiled shape: pad with empty windows
            pad = ((0, batch_size - rows), (0, 0))
            batch_tokens, batch_mask = np.pad(batch_tokens, pad), np.pad(batch_mask, pad)
        out = record(batch_tokens, batch_mask)
        valid = batch_mask[:rows].astype(bool)
        count = int(valid.sum())
        for name, array in arrays.items():
            array[:, offset:offset + count] = out[name][:, :rows][:, valid]
        offset += count
    for array in arrays.values():
        array.flush()
    return Collected.open(directory)
