"""Shared test settings: float32 CPU math, the `../shared` fixtures, GPU skipping."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jax\.experimental\.pallas")

SHARED = Path(os.environ.get("POLAR_JAX_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def shared_path(*parts: str) -> Path:
    """A file under `../shared`, or a skip when the checkout has no `../shared` beside it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared fixtures live in ../shared beside the checkout")
    return path


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; the default JAX backend is CPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
