"""Pallas GPU kernels for Polar Sparsity decoding (Triton lowering; interpret mode on CPU)."""

from pallas_kernels.activations import ACTIVATIONS, get_activation
from pallas_kernels.kv_write import write_kv_token, write_kv_token_reference
from pallas_kernels.neuron_scores import neuron_scores, neuron_scores_reference
from pallas_kernels.selective_mlp import selective_mlp, selective_mlp_reference
from pallas_kernels.sparse_attention import (
    sparse_decode_attention,
    sparse_decode_attention_reference,
)
from pallas_kernels.topk_select import topk_indices, topk_indices_reference

__all__ = [
    "ACTIVATIONS",
    "get_activation",
    "neuron_scores",
    "neuron_scores_reference",
    "selective_mlp",
    "selective_mlp_reference",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "topk_indices",
    "topk_indices_reference",
    "write_kv_token",
    "write_kv_token_reference",
]
