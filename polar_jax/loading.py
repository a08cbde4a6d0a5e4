"""Loading a model from a converted directory or straight from a Hugging Face directory.

Every file is read through `polar_jax.files` (inside the directory, regular files only), and
the loaded parameters are checked to be finite in the dtype they are loaded in.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.checkpoint import TOKENIZER_FILES, read_config, read_json, resolve_source
from convert.convert import FORMAT_VERSION, METADATA_FILE, PARAMS_DIR, read_hf_params, source_dtype
from models import ModelConfig, build_model, config_from_hf
from polar_jax import validate
from polar_jax.dtypes import DTYPES
from polar_jax.errors import PolarJaxError
from polar_jax.files import check_tree, checkpoint_file, first_non_finite, restore_arrays


def is_converted(path: Path) -> bool:
    return os.path.lexists(path / METADATA_FILE)


def load_model(path: str, dtype=None, sharding: jax.sharding.Sharding | None = None):
    """(config, model) for a converted directory or a Hugging Face checkpoint directory.

    Parameters are cast to `dtype` (default: as stored) and must be finite in it. `sharding`
    places every parameter (default: the first device).
    """
    src = resolve_source(path)
    hf_config = read_config(src)
    config = config_from_hf(hf_config)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if is_converted(src):
        metadata = validate.mapping(str(src / METADATA_FILE), read_json(src, METADATA_FILE))
        if metadata.get("format") != FORMAT_VERSION:
            raise PolarJaxError(
                f"{src} holds polar-jax format {metadata.get('format')}; this version reads format "
                f"{FORMAT_VERSION} (fused q/k/v and gate/up weights): convert the checkpoint again "
                f"with `polar-jax convert SRC {src} --force`")
        stored = validate.string(f"{src / METADATA_FILE}: 'dtype'", metadata.get("dtype"),
                                 tuple(DTYPES))
        dtype = jnp.dtype(dtype or stored)
        params = _restore(src, config, dtype, sharding)
    else:
        stored = source_dtype(hf_config)
        dtype = jnp.dtype(dtype or stored)
        params = jax.device_put(read_hf_params(src, config, dtype.name), sharding)
    _check_finite(src, params, dtype, jnp.dtype(stored))
    model = build_model(config, dtype)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return config, nnx.merge(graphdef, state)


def _restore(src: Path, config: ModelConfig, dtype, sharding):
    abstract = nnx.to_pure_dict(nnx.split(build_model(config, dtype))[1])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sharding), abstract)
    return restore_arrays(src, PARAMS_DIR, target)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> list[jax.Array]:
    """One boolean per array: every element finite (one fused reduction each)."""
    return [jnp.isfinite(leaf).all() for leaf in leaves]


def _check_finite(src: Path, params: dict, dtype: np.dtype, stored: np.dtype) -> None:
    """Refuses a NaN or Inf in the loaded params (one host sync), naming the first parameter
    with one, its index and, when loaded narrower than stored, the range it overflowed."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    finite = jax.device_get(_all_finite([leaf for _, leaf in flat]))
    bad = next((i for i, ok in enumerate(finite) if not ok), None)
    if bad is None:
        return
    keys, leaf = flat[bad]
    name = "/".join(str(getattr(key, "key", key)) for key in keys)
    index, kind = first_non_finite(np.asarray(jax.device_get(leaf)))
    if kind != "NaN" and not np.can_cast(stored, dtype, "safe"):
        hint = (f"its stored {stored.name} value lies beyond the range of {dtype.name}; "
                "load it in a wider dtype")
    else:
        hint = "weights must be finite"
    raise PolarJaxError(f"{src}: parameter {name!r} holds {kind} at index {index} as {dtype.name}; "
                        f"{hint}")


def load_tokenizer(path: str):
    """The Hugging Face tokenizer stored beside the model (read from local files only, every
    file of the directory, and every existing path its tokenizer_config.json names, checked
    first: the tokenizer chooses which it opens)."""
    from transformers import AutoTokenizer

    src = resolve_source(path)
    if not any(os.path.lexists(src / name) for name in TOKENIZER_FILES):
        raise PolarJaxError(
            f"{src} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
            "files of the original checkpoint next to the model"
        )
    check_tree(src)
    if os.path.lexists(src / "tokenizer_config.json"):  # older transformers open the paths it names
        settings = validate.mapping(str(src / "tokenizer_config.json"),
                                    read_json(src, "tokenizer_config.json"))
        for key, value in settings.items():
            if key.endswith("_file") and isinstance(value, str) and os.path.lexists(src / value):
                checkpoint_file(src, value, named_by=f"{src / 'tokenizer_config.json'} {key!r} names")
    try:
        return AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as err:
        raise PolarJaxError(f"cannot load a tokenizer from {src}: {err}") from None


def load_eos_ids(path: str) -> list[int]:
    """End-of-sequence ids from `generation_config.json`, else `config.json`."""
    src = resolve_source(path)
    for name in ("generation_config.json", "config.json"):
        if os.path.lexists(src / name):
            eos = validate.mapping(str(src / name), read_json(src, name)).get("eos_token_id")
            if eos is not None:
                label = f"{src / name}: 'eos_token_id'"
                ids = validate.listing(label, eos) if isinstance(eos, (list, tuple)) else [eos]
                return [validate.integer(label, i, low=0) for i in ids]
    return []
