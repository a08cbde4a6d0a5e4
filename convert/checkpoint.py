"""Reading Hugging Face checkpoints tensor by tensor: safetensors (single or sharded) and,
only when allowed, pickled PyTorch `.bin` files (loaded with `weights_only=True`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from polar_jax import validate
from polar_jax.errors import PolarJaxError
from polar_jax.files import checkpoint_file, read_checkpoint_file

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Everything besides the weights that a converted directory keeps (those present are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one defines a vocabulary
GENERATION_CONFIG = "generation_config.json"
SIDE_FILES = TOKENIZER_FILES + (
    "tokenizer_config.json", "special_tokens_map.json", "merges.txt", "added_tokens.json",
    GENERATION_CONFIG,
)


def resolve_source(src: str | os.PathLike) -> Path:
    """The local checkpoint directory `src` (nothing is downloaded: polar-jax reads local files
    only)."""
    path = Path(src)
    if path.is_dir():
        return path
    if os.path.lexists(path):
        raise PolarJaxError(f"{src} is a file; expected a Hugging Face checkpoint directory")
    raise PolarJaxError(f"{src} does not exist (expected a local Hugging Face checkpoint directory)")


def parse_json(path: Path, data: bytes):
    """The JSON text `data`, the contents of the file `path`."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise PolarJaxError(f"{path} is not readable JSON: {err}") from None


def read_json(src: Path, name: str):
    """The JSON file `name` of the checkpoint directory `src` (see `read_checkpoint_file`)."""
    return parse_json(src / name, read_checkpoint_file(src, name))


def config_json(src: Path, data: bytes | None) -> dict:
    """The checkpoint's `config.json` (its bytes `data`, None when absent) as a dict."""
    if data is None:
        raise PolarJaxError(f"{src} has no config.json; is it a Hugging Face checkpoint directory?")
    return validate.mapping(str(src / "config.json"), parse_json(src / "config.json", data))


def read_config(src: Path) -> dict:
    """The checkpoint's `config.json` as a dict."""
    return config_json(src, read_checkpoint_file(src, "config.json", optional=True))


def _shards(src: Path, index_name: str) -> list[Path]:
    index = validate.mapping(str(src / index_name), read_json(src, index_name))
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise PolarJaxError(f"{src / index_name} has no weight_map")
    files = dict.fromkeys(validate.string(f"{src / index_name}: weight_map[{tensor!r}]", f)
                          for tensor, f in weight_map.items())
    return [checkpoint_file(src, f, named_by=f"{src / index_name} names shard") for f in files]


def weight_files(src: Path, allow_pickle: bool) -> tuple[str, list[Path]]:
    """("safetensors" | "pickle", the real paths of the files to read in order)."""
    present = {name for name in (SAFETENSORS_INDEX, SAFETENSORS_FILE, PICKLE_INDEX, PICKLE_FILE)
               if os.path.lexists(src / name)}
    if SAFETENSORS_INDEX in present:
        return "safetensors", _shards(src, SAFETENSORS_INDEX)
    if SAFETENSORS_FILE in present:
        return "safetensors", [checkpoint_file(src, SAFETENSORS_FILE)]
    if present and not allow_pickle:
        raise PolarJaxError(
            f"{src} holds only pickled PyTorch weights ({PICKLE_FILE}); pickles can run code when "
            "loaded, so pass --allow-pickle to read them (with torch.load(weights_only=True))"
        )
    if PICKLE_INDEX in present:
        return "pickle", _shards(src, PICKLE_INDEX)
    if PICKLE_FILE in present:
        return "pickle", [checkpoint_file(src, PICKLE_FILE)]
    raise PolarJaxError(
        f"{src} has no weights: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, or "
        f"(with --allow-pickle) {PICKLE_FILE}"
    )


def count_tensors(kind: str, files: list[Path]) -> int | None:
    """Number of tensors, when it can be read without loading them (for the progress bar)."""
    if kind != "safetensors":
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        try:
            with safe_open(f, framework="flax") as st:
                total += len(list(st.keys()))
        except Exception as err:
            raise PolarJaxError(f"{f} is not a readable safetensors file (truncated?): {err}") from None
    return total


def _iter_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    cpu = jax.local_devices(backend="cpu")[0]
    try:
        with jax.default_device(cpu), safe_open(path, framework="flax") as st:
            for name in st.keys():
                yield name, np.asarray(st.get_tensor(name))
    except PolarJaxError:
        raise
    except Exception as err:
        raise PolarJaxError(f"{path} is not a readable safetensors file (truncated?): {err}") from None


def _iter_pickle(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise PolarJaxError(f"reading {path} needs PyTorch installed") from None
    import ml_dtypes

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # pre-1.6 (non-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PolarJaxError(f"{path} is not a readable PyTorch checkpoint: {err}") from None
    odd = (f"a {type(state).__name__}" if not isinstance(state, dict) else next(
        (f"the entry {validate.describe(k)}: {type(v).__name__}" for k, v in state.items()
         if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None))
    if odd is not None:
        raise PolarJaxError(f"{path} is not a state dict (names to tensors): it holds {odd}")
    for name in list(state):
        t = state.pop(name)
        if t.dtype == torch.bfloat16:
            yield name, t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, t.numpy()


def iter_tensors(kind: str, files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) for every tensor of every file, one at a time."""
    read = _iter_safetensors if kind == "safetensors" else _iter_pickle
    for f in files:
        yield from read(f)
