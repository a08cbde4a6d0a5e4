"""Perplexity with a fixed protocol, so numbers compare across models, dtypes and modes.

Protocol: tokenize the whole text once with no special tokens; keep the first `max_tokens`;
cut into non-overlapping windows of `seq_len` tokens (`polar_jax.windows`: a shorter last
window is kept if it has at least 2 tokens); score every token after the first of each window;
perplexity = exp(mean negative log-likelihood).

`retrieval` is the long-context check of page sparsity: the accuracy of predicting a random
token sequence's repeat from its first occurrence 500-900 positions back.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from models.sharding import batch_sharding, dp_size, global_array, replicated, to_host
from models.ops import DenseOps
from polar_jax.errors import PolarJaxError
from polar_jax.files import input_file
from polar_jax.memory import check_fits
from polar_jax.settings import EvalSettings
from polar_jax.windows import make_windows


def read_text(path: str) -> str:
    """The UTF-8 text of the regular file `path`, which must hold more than whitespace."""
    try:
        text = input_file(path, "text file").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PolarJaxError(f"cannot read text file {path} as UTF-8: {err}") from None
    if not text.strip():
        raise PolarJaxError(f"text file {path} is empty")
    return text


def _nll_fn(model, make_ops=None, routers=None, mesh=None):
    """A jitted `(tokens, mask) -> (sum of NLL, scored count)` over the model's state.

    `make_ops(key_valid, routers)` builds the blocks' ops (default: `DenseOps`); `routers` is
    passed to the jitted function as an argument, not baked in as a constant. With a `mesh`,
    the windows are split over `data` (the model is split already) and the sums replicated.
    """
    graphdef, state = nnx.split(model)
    place = lambda x: x
    out_shardings = None
    if mesh is not None:
        rows, out_shardings = batch_sharding(mesh, 2), (replicated(mesh),) * 2
        place = lambda x: global_array(x, rows)
        if routers is not None:
            routers = jax.device_put(routers, replicated(mesh))

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def nll(state, routers, tokens, mask):
        model = nnx.merge(graphdef, state)
        return model.nll(tokens, mask, DenseOps(mask) if make_ops is None else make_ops(mask, routers))

    return lambda tokens, mask: nll(state, routers, place(tokens), place(mask))


def _check_memory(config, model, batch_size: int, seq_len: int) -> None:
    """The largest buffers of one evaluation step: one layer's attention scores, the MLP
    activations and the logits with their log-softmax (all float32)."""
    tokens = batch_size * seq_len
    scores = batch_size * config.num_heads * seq_len**2 * 4
    mlp = tokens * config.mlp_dim * (2 if config.gated_mlp else 1) * 4
    logits = 2 * tokens * config.vocab_size * 4
    check_fits(f"--seq-len {seq_len} at a batch of {batch_size} windows",
               {"attention scores": scores, "MLP activations": mlp, "logits": logits},
               jax.local_devices()[0], "--batch-size or --seq-len")


def perplexity(model, config, tokenizer, text: str, seq_len: int = EvalSettings.seq_len,
               max_tokens: int | None = None, batch_size: int = EvalSettings.batch_size,
               progress: bool = False, make_ops=None, routers=None, mesh=None) -> dict:
    """{"perplexity", "nll" (mean), "tokens" (scored count), "windows"} for `text`; the blocks
    run through `make_ops(key_valid, routers)` when given (sparse and oracle evaluation). Positions
    and memory are checked before anything is compiled. With a `mesh` (the model loaded onto
    it), the windows of a batch are split over its `data` axis."""
    run = EvalSettings(seq_len, max_tokens, batch_size)
    config.check_seq_len(run.seq_len)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    ids = ids[:run.max_tokens]
    if len(ids) < 2:
        raise PolarJaxError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    tokens, mask = make_windows(ids, run.seq_len)
    data = dp_size(mesh)
    batch_size = -(-min(run.batch_size, len(tokens)) // data) * data
    _check_memory(config, model, batch_size // data, run.seq_len)
    pad = -len(tokens) % batch_size  # whole batches only: one compiled shape
    tokens = np.concatenate([tokens, np.zeros((pad, run.seq_len), np.int32)])
    mask = np.concatenate([mask, np.zeros((pad, run.seq_len), np.int32)])
    nll = _nll_fn(model, make_ops, routers, mesh)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(tokens), batch_size), desc="windows", unit="batch",
                      disable=not progress):
        batch_nll, batch_count = nll(tokens[start:start + batch_size], mask[start:start + batch_size])
        total += float(to_host(batch_nll))
        count += int(to_host(batch_count))
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count,
            "windows": len(tokens) - pad}


# The long-context retrieval check (issue 28): a random token sequence of REPEAT_TOKENS,
# repeated REPEAT_DISTANCE positions later inside filler text.
REPEAT_TOKENS = (64, 128)
REPEAT_DISTANCE = (500, 900)


def retrieval_windows(ids, vocab_size: int, trials: int, seq_len: int, seed: int = 0):
    """`trials` windows of `seq_len` tokens of the text `ids` (random offsets), each with a
    random token sequence (length in `REPEAT_TOKENS`) written twice, the second copy
    `REPEAT_DISTANCE` positions after the first (cut to fit `seq_len`): (tokens `[N, seq_len]`,
    first `[N, seq_len]` and repeat `[N, seq_len]` bool, the positions whose next token is the
    first copy's (unpredictable) or the repeat's (retrievable) 2nd to last)."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((trials, seq_len), np.int32)
    first = np.zeros((trials, seq_len), bool)
    repeat = np.zeros((trials, seq_len), bool)
    for i in range(trials):
        n = int(rng.integers(REPEAT_TOKENS[0], REPEAT_TOKENS[1] + 1))
        n = min(n, seq_len // 3)
        far = min(REPEAT_DISTANCE[1], seq_len - n)
        back = int(rng.integers(min(REPEAT_DISTANCE[0], far), far + 1))
        start = int(rng.integers(0, seq_len - back - n + 1))
        offset = int(rng.integers(0, max(1, len(ids) - seq_len)))
        window = np.resize(ids[offset:offset + seq_len], seq_len)
        sequence = rng.integers(1, vocab_size, n)
        window[start:start + n] = window[start + back:start + back + n] = sequence
        tokens[i] = window
        first[i, start:start + n - 1] = True
        repeat[i, start + back:start + back + n - 1] = True
    return tokens, first, repeat


def retrieval(model, config, tokenizer, text: str, trials: int = 16, seq_len: int = 1024,
              batch_size: int = EvalSettings.batch_size, seed: int = 0, make_ops=None,
              routers=None) -> dict:
    """Greedy next-token accuracy on `retrieval_windows` of `text`: over the repeated
    sequence's positions ("accuracy", the induction the KV cache must serve from 500-900
    positions back) and over its first occurrence ("first_accuracy", chance: nothing to
    retrieve). The blocks run through `make_ops(key_valid, routers)` (default: dense)."""
    config.check_seq_len(seq_len)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    if len(ids) < 2:
        raise PolarJaxError(f"the text has {len(ids)} token(s); the retrieval filler needs more")
    tokens, first, repeat = retrieval_windows(ids, config.vocab_size, trials, seq_len, seed)
    graphdef, state = nnx.split(model)

    @jax.jit
    def predict(state, routers, tokens):
        model = nnx.merge(graphdef, state)
        mask = jnp.ones(tokens.shape, jnp.int32)
        ops = DenseOps(mask) if make_ops is None else make_ops(mask, routers)
        out = model.forward(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
                            ops)
        return jnp.argmax(model.logits(out.hidden_states), axis=-1)

    pad = -trials % batch_size
    padded = np.concatenate([tokens, np.zeros((pad, seq_len), np.int32)])
    right = np.concatenate([np.asarray(predict(state, routers, padded[i:i + batch_size]))
                            for i in range(0, len(padded), batch_size)])[:trials, :-1]
    right = right == tokens[:, 1:]
    return {"accuracy": float(right[repeat[:, :-1]].mean()),
            "first_accuracy": float(right[first[:, :-1]].mean()),
            "scored": int(repeat.sum()), "trials": trials, "seq_len": seq_len}
