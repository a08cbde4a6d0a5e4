"""`polar-jax convert`: a Hugging Face checkpoint -> a directory of orbax params in our layouts.

Output directory:
    config.json        the source's Hugging Face config, unchanged
    polar_jax.json     format version, parameter dtype, source
    params/            orbax-checkpoint of the model state (a nested dict of arrays)
    tokenizer files and generation_config.json, copied when present
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert.checkpoint import (
    GENERATION_CONFIG,
    SIDE_FILES,
    config_json,
    count_tensors,
    iter_tensors,
    parse_json,
    resolve_source,
    weight_files,
)
from models.config import ModelConfig, eos_token_ids
from models.registry import canonical_name, config_from_hf, param_specs
from polar_jax import validate
from polar_jax.dtypes import DTYPES, parse_dtype
from polar_jax.errors import PolarJaxError
from polar_jax.files import atomic_output, cast_checked, read_checkpoint_file, save_arrays

FORMAT_VERSION = 3  # 2: q/k/v as one `w_qkv`, gate and up as one `w_gate_up`; 3: q/k/v by KV group
METADATA_FILE = "polar_jax.json"
PARAMS_DIR = "params"


def source_dtype(hf_config: dict) -> str:
    """The dtype the checkpoint was saved in, per its config (float32 when unstated)."""
    key = "dtype" if hf_config.get("dtype") is not None else "torch_dtype"
    name = hf_config.get(key) or "float32"
    return validate.string(f"config.json: {key!r}", name, tuple(DTYPES))


def read_hf_params(src: Path, config: ModelConfig, dtype: str, allow_pickle: bool = False,
                   progress: bool = False) -> dict:
    """Streams the checkpoint at `src` into the nested param dict of `config`'s model.

    Every tensor is checked against the model's expectations: a missing, unexpected,
    misshapen or non-float tensor, a NaN or Inf, or a value beyond `dtype`'s range is an error
    naming it.
    """
    target = parse_dtype(dtype)
    specs = param_specs(config)
    kind, files = weight_files(src, allow_pickle)
    params: dict = {}
    seen: set[str] = set()
    bar = tqdm(total=count_tensors(kind, files), desc="tensors", unit="tensor", disable=not progress)
    with bar:
        for hf_name, array in iter_tensors(kind, files):
            bar.update()
            name = canonical_name(hf_name, config)
            if name is None:
                continue
            spec = specs.get(name)
            if spec is None:
                raise PolarJaxError(
                    f"unexpected tensor {hf_name!r} {tuple(array.shape)} in {src}: a "
                    f"{config.model_type} model with this config.json has no such weight"
                )
            if name in seen:
                raise PolarJaxError(f"tensor {hf_name!r} appears twice in {src}")
            if tuple(array.shape) != spec.hf_shape:
                raise PolarJaxError(
                    f"tensor {hf_name!r} has shape {tuple(array.shape)}, but config.json implies "
                    f"{spec.hf_shape}"
                )
            if not np.issubdtype(array.dtype, np.floating) and array.dtype != ml_dtypes.bfloat16:
                raise PolarJaxError(f"tensor {hf_name!r} has non-float dtype {array.dtype}")
            seen.add(name)
            node = params
            for key in spec.path[:-1]:
                node = node.setdefault(key, {})
            value = spec.transform(cast_checked(f"tensor {hf_name!r}", array, target))
            if spec.part is None:
                node[spec.path[-1]] = np.ascontiguousarray(value)
            else:  # one part of a tensor stored together with others (every part is required)
                if spec.path[-1] not in node:
                    node[spec.path[-1]] = np.empty(spec.full_shape, target)
                node[spec.path[-1]][spec.part] = value
    missing = [name for name in specs if name not in seen]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise PolarJaxError(f"checkpoint {src} is missing tensor(s) {shown}{more}")
    return params


def convert_checkpoint(src: str, dst: str, dtype: str | None = None, allow_pickle: bool = False,
                       force: bool = False, progress: bool = False) -> Path:
    """Converts the HF checkpoint `src` into `dst`; returns `dst`.

    The output is assembled beside `dst` and moved into place at the end
    (`polar_jax.files.atomic_output`): a `dst` overlapping `src` is refused, an existing one
    is replaced only with `force`, and an error never leaves a partial `dst`.
    """
    src_path = resolve_source(src)
    with atomic_output(dst, force=force, inputs={"the source checkpoint": src_path}) as staging:
        # Each kept file read once, through one checked descriptor: what is checked and
        # converted is what is written, whatever is swapped into SRC meanwhile.
        kept = {name: read_checkpoint_file(src_path, name, optional=True)
                for name in ("config.json",) + SIDE_FILES}
        hf_config = config_json(src_path, kept["config.json"])
        config = config_from_hf(hf_config)
        dtype = dtype or source_dtype(hf_config)
        generation = kept[GENERATION_CONFIG]
        eos_token_ids(((str(src_path / GENERATION_CONFIG), {} if generation is None else
                        validate.mapping(str(src_path / GENERATION_CONFIG),
                                         parse_json(src_path / GENERATION_CONFIG, generation))),
                       (str(src_path / "config.json"), hf_config)))  # generate would refuse it
        params = read_hf_params(src_path, config, dtype, allow_pickle, progress)
        save_arrays(staging.path / PARAMS_DIR, params)
        for name, data in kept.items():
            if data is not None:
                (staging.path / name).write_bytes(data)
        metadata = {"format": FORMAT_VERSION, "dtype": dtype, "model_type": config.model_type,
                    "source": str(src)}
        (staging.path / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return Path(dst)
