"""Loading a model from a converted directory or straight from a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from convert.checkpoint import TOKENIZER_FILES, read_config, read_json, resolve_source
from convert.convert import FORMAT_VERSION, METADATA_FILE, PARAMS_DIR, read_hf_params, source_dtype
from models import ModelConfig, build_model, config_from_hf
from polar_jax.errors import PolarJaxError


def is_converted(path: Path) -> bool:
    return (path / METADATA_FILE).exists()


def load_model(path: str, dtype=None, sharding: jax.sharding.Sharding | None = None):
    """(config, model) for a converted directory or a Hugging Face checkpoint directory.

    Parameters are cast to `dtype` (default: as stored). `sharding` places every parameter
    (default: the first device).
    """
    src = resolve_source(path)
    config = config_from_hf(read_config(src))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if is_converted(src):
        metadata = read_json(src / METADATA_FILE)
        if metadata.get("format") != FORMAT_VERSION:
            raise PolarJaxError(
                f"{src} holds polar-jax format {metadata.get('format')}; this version reads format "
                f"{FORMAT_VERSION} (fused q/k/v and gate/up weights): convert the checkpoint again "
                f"with `polar-jax convert SRC {src} --force`")
        dtype = dtype or jnp.dtype(metadata["dtype"])
        params = _restore(src / PARAMS_DIR, config, dtype, sharding)
    else:
        stored = source_dtype(read_config(src))
        dtype = dtype or jnp.dtype(stored)
        host = read_hf_params(src, config, stored)
        params = jax.tree.map(lambda a: jax.device_put(jnp.asarray(a, dtype), sharding), host)
    model = build_model(config, dtype)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return config, nnx.merge(graphdef, state)


def _restore(directory: Path, config: ModelConfig, dtype, sharding):
    import orbax.checkpoint as ocp

    abstract = nnx.to_pure_dict(nnx.split(build_model(config, dtype))[1])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sharding), abstract)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(directory.absolute(), target)
    except Exception as err:
        raise PolarJaxError(f"cannot read the params in {directory}: {err}") from None


def load_tokenizer(path: str):
    """The Hugging Face tokenizer stored beside the model (read from local files only)."""
    from transformers import AutoTokenizer

    src = resolve_source(path)
    if not any((src / name).exists() for name in TOKENIZER_FILES):
        raise PolarJaxError(
            f"{src} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer "
            "files of the original checkpoint next to the model"
        )
    try:
        return AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as err:
        raise PolarJaxError(f"cannot load a tokenizer from {src}: {err}") from None


def load_eos_ids(path: str) -> list[int]:
    """End-of-sequence ids from `generation_config.json`, else `config.json`."""
    src = resolve_source(path)
    for name in ("generation_config.json", "config.json"):
        if (src / name).exists():
            eos = read_json(src / name).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []
