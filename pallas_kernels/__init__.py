"""Pallas GPU kernels for Polar Sparsity decoding (Triton lowering; interpret mode on CPU)."""

from pallas_kernels.activations import ACTIVATIONS, get_activation

__all__ = ["ACTIVATIONS", "get_activation"]
