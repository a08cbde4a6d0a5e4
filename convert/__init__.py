"""Converters from Hugging Face PyTorch checkpoints to polar-jax parameter directories."""

from convert.convert import convert_checkpoint, read_hf_params

__all__ = ["convert_checkpoint", "read_hf_params"]
