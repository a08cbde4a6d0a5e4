"""The names of a decode step's parts: the `jax.named_scope`s the model and the sparse ops run
under, which `polar_jax.bench.trace` reads back from a compiled program to split a profile.

A leaf of `models` (imports nothing), so that the model, the ops and the profiler share one
spelling of each part.
"""

NORM = "norm"
ROPE = "rope"
QKV_PROJ = "qkv_proj"
ATTENTION = "attention"
KV_WRITE = "kv_write"
OUT_PROJ = "out_proj"
MLP = "mlp"
LOGITS = "logits"
ROUTERS = "routers"  # both routers' shared projection of the attention input
ATTN_ROUTER = "attn_router"  # top-k KV groups per row
PAGE_SELECT = "page_select"  # page sparsity: each kept group's pages by their summaries
MLP_ROUTER = "mlp_router"  # the batch's top-k neurons

ALL = (KV_WRITE, ROUTERS, ATTN_ROUTER, PAGE_SELECT, MLP_ROUTER, NORM, ROPE, QKV_PROJ, ATTENTION, OUT_PROJ,
       MLP, LOGITS)
