"""A model directory, converted or straight from Hugging Face, resolved and read once.

Every file is read through `polar_jax.files` (inside the directory, regular files only), and
the loaded parameters are checked to be finite in the dtype they are loaded in.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from convert.checkpoint import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    read_config,
    read_json,
    resolve_source,
)
from convert.convert import FORMAT_VERSION, METADATA_FILE, PARAMS_DIR, read_hf_params, source_dtype
from models import ModelConfig, build_model, config_from_hf
from models.config import eos_token_ids
from models.sharding import check_split, global_array, param_shardings, to_host
from polar_jax import validate
from polar_jax.dtypes import DTYPES
from polar_jax.errors import PolarJaxError
from polar_jax.files import check_tree, checkpoint_file, first_non_finite, restore_arrays
from polar_jax.memory import check_fits


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """A model directory: a converted polar-jax directory (`polar_jax.json`, orbax `params/`)
    or a Hugging Face checkpoint directory (safetensors), opened once by `ModelDir.open`.

    `config.json` is parsed and the format checked on opening; the tokenizer and the EOS ids
    are read on first use and kept; `load(dtype)` builds the model.
    """

    path: Path  # as given (messages name it so); every file in it is read through the checks
    hf_config: dict  # config.json as stored
    config: ModelConfig
    converted: bool  # a polar-jax directory, else a Hugging Face checkpoint
    stored_dtype: np.dtype  # of the parameters on disk

    @classmethod
    def open(cls, path: str | os.PathLike) -> ModelDir:
        """The directory `path`, its config.json parsed and, when converted, its format and
        stored dtype checked."""
        src = resolve_source(path)
        hf_config = read_config(src)
        config = config_from_hf(hf_config)
        converted = os.path.lexists(src / METADATA_FILE)
        if converted:
            metadata = validate.mapping(str(src / METADATA_FILE), read_json(src, METADATA_FILE))
            if metadata.get("format") != FORMAT_VERSION:
                raise PolarJaxError(
                    f"{src} holds polar-jax format {metadata.get('format')}; this version reads "
                    f"format {FORMAT_VERSION} (q/k/v grouped by KV head, gate/up fused): convert the "
                    f"checkpoint again with `polar-jax convert SRC {src} --force`")
            stored = validate.string(f"{src / METADATA_FILE}: 'dtype'", metadata.get("dtype"),
                                     tuple(DTYPES))
        else:
            stored = source_dtype(hf_config)
        return cls(src, hf_config, config, converted, jnp.dtype(stored))

    def load(self, dtype=None, mesh: Mesh | None = None) -> nnx.Module:
        """The model, its parameters cast to `dtype` (default: as stored) and finite in it, on
        the first device, or with a `mesh` each parameter split by the sharding rules
        (`models.sharding`) and restored straight into its shards (a converted directory:
        each device receives only its shard). Refused in one line before anything is read
        when a device's share of the weights does not fit it."""
        dtype = jnp.dtype(dtype or self.stored_dtype)
        abstract = nnx.to_pure_dict(nnx.split(build_model(self.config, dtype))[1])
        if mesh is None:
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: one, abstract)
        else:
            check_split(self.config, mesh)
            shardings = param_shardings(abstract, mesh)
        target = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sharding),
                              abstract, shardings)
        per_device = sum(int(np.prod(t.sharding.shard_shape(t.shape))) * dtype.itemsize
                         for t in jax.tree.leaves(target))
        devices = 1 if mesh is None else mesh.size
        check_fits(f"the weights of {self.path} in {dtype.name}"
                   + (f" split over {devices} devices" if mesh is not None else ""),
                   {"weights per device": per_device}, jax.local_devices()[0],
                   "--dtype, or spread the model over more devices (--tp)")
        if self.converted:
            params = restore_arrays(self.path, PARAMS_DIR, target)
        else:
            host = read_hf_params(self.path, self.config, dtype.name)
            params = jax.tree.map(lambda x, t: global_array(x, t.sharding), host, target)
        _check_finite(self.path, params, dtype, self.stored_dtype)
        graphdef, state = nnx.split(build_model(self.config, dtype))
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)

    @functools.cached_property
    def tokenizer(self):
        """The Hugging Face tokenizer stored beside the model (read from local files only, every
        file of the directory, and every existing path its tokenizer_config.json names, checked
        first: the tokenizer chooses which it opens)."""
        from transformers import AutoTokenizer

        src = self.path
        if not any(os.path.lexists(src / name) for name in TOKENIZER_FILES):
            raise PolarJaxError(
                f"{src} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
                "tokenizer files of the original checkpoint next to the model")
        check_tree(src)
        if os.path.lexists(src / "tokenizer_config.json"):  # older transformers open the paths it names
            settings = validate.mapping(str(src / "tokenizer_config.json"),
                                        read_json(src, "tokenizer_config.json"))
            for key, value in settings.items():
                if key.endswith("_file") and isinstance(value, str) and os.path.lexists(src / value):
                    checkpoint_file(src, value,
                                    named_by=f"{src / 'tokenizer_config.json'} {key!r} names")
        try:
            return AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        except Exception as err:
            raise PolarJaxError(f"cannot load a tokenizer from {src}: {err}") from None

    @functools.cached_property
    def eos_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids from `generation_config.json`, else `config.json` (none: ())."""
        generation = {}
        if os.path.lexists(self.path / GENERATION_CONFIG):
            generation = validate.mapping(str(self.path / GENERATION_CONFIG),
                                          read_json(self.path, GENERATION_CONFIG))
        return eos_token_ids(((str(self.path / GENERATION_CONFIG), generation),
                              (str(self.path / "config.json"), self.hf_config)))


def load_model(path: str | os.PathLike, dtype=None, mesh: Mesh | None = None
               ) -> tuple[ModelConfig, nnx.Module]:
    """(config, model) of the directory `path`: `ModelDir.open(path)` and its `load`."""
    model_dir = ModelDir.open(path)
    return model_dir.config, model_dir.load(dtype, mesh)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of the directory `path` (`ModelDir.tokenizer`)."""
    return ModelDir.open(path).tokenizer


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> list[jax.Array]:
    """One boolean per array: every element finite (one fused reduction each)."""
    return [jnp.isfinite(leaf).all() for leaf in leaves]


def _check_finite(src: Path, params: dict, dtype: np.dtype, stored: np.dtype) -> None:
    """Refuses a NaN or Inf in the loaded params (one host sync), naming the first parameter
    with one, its index and, when loaded narrower than stored, the range it overflowed."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    finite = [to_host(ok) for ok in _all_finite([leaf for _, leaf in flat])]
    bad = next((i for i, ok in enumerate(finite) if not ok), None)
    if bad is None:
        return
    keys, leaf = flat[bad]
    name = "/".join(str(getattr(key, "key", key)) for key in keys)
    index, kind = first_non_finite(to_host(leaf))
    if kind != "NaN" and not np.can_cast(stored, dtype, "safe"):
        hint = (f"its stored {stored.name} value lies beyond the range of {dtype.name}; "
                "load it in a wider dtype")
    else:
        hint = "weights must be finite"
    raise PolarJaxError(f"{src}: parameter {name!r} holds {kind} at index {index} as {dtype.name}; "
                        f"{hint}")
