"""The serving engine's device side: the page pool, the per-slot state, and the compiled
programs that the scheduler's iterations run on them.

Everything a decode step reads lives on the device (`Slots`: each slot's latest token,
position, stop position, sampling settings, seed and block-table row) and is updated there:
the decode step advances its rows and stops a row itself at EOS, at `max_tokens` and at the
context; a prefill that finishes a prompt puts the sampled first token into the row. The host
sends only what changed, rows rewritten by slot edits (an admission, a move, a new page, a
freed slot) and the prompt chunks, each in one explicit transfer counted in `transfers`: a
decode step with nothing changed transfers nothing to the device (the engine's thread runs
under `jax.transfer_guard_host_to_device("disallow")`, so nothing is copied implicitly).

Programs, each compiled once at `warm_up` (every shape is fixed): the decode step per batch
bucket (with its sparsity plan: the bucket is the plan's batch size), on a GPU greedy and
sampling (the host, which knows every row's settings, picks one per step: a `lax.cond` on the
device would make the call wait for the logits, and the host's work would not overlap the next
step), the prefill of
`prefill_rows` chunks of `prefill_chunk` tokens (with and without the prompt's
log-probabilities for `echo`), and the edit of up to every slot's row. The pool and the
slots are donated to each program and replaced by its outputs.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.kv_cache import PagedKVCache
from models.ops import ChunkOps
from models.sharding import kv_cache_shardings, tp_size
from polar_jax.decode import Decoder
from polar_jax.memory import available_bytes
from polar_jax.sampling import SamplingParams, sample_rows
from polar_jax.serve.kv_pages import MemoryPlan, plan_pages
from polar_jax.serve.request import TOP_LOGPROBS
from polar_jax.serve.scheduler import PrefillChunk, SlotEdit
from polar_jax.step import DecodeState, decode_step



def pow2_sizes(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `limit`, then `limit`."""
    sizes = [1 << i for i in range(limit.bit_length()) if 1 << i < limit]
    return (*sizes, limit)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    """Per slot `[S]` on the device: the latest token (the next step's input), its position,
    whether the device decodes it, `end` (the position it stops before), the sampling
    settings and seed, and the block-table row `[S, pages_per_seq]` (the pool size past a
    sequence's pages: writes there are dropped, reads never reach them)."""

    tokens: jax.Array
    positions: jax.Array
    active: jax.Array
    end: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seeds: jax.Array
    block_table: jax.Array

    def replace(self, **changes) -> "Slots":
        return dataclasses.replace(self, **changes)

    def rows(self, index) -> "Slots":
        return jax.tree.map(lambda x: x[index], self)

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)


# The columns of a slot edit: one int32 row per rewritten slot, so that an edit is one transfer.
# `target`: the slot (the slot count: padding, dropped); `source`: the row whose token and
# position it keeps (-1: none); `keep`: whether it may stay active (the device's flag of
# `source` then decides); then the host's fields of the new row (floats and the seed as their
# bits), then its block-table row.
EDIT_TARGET, EDIT_SOURCE, EDIT_KEEP, EDIT_END, EDIT_TEMPERATURE, EDIT_TOP_K, EDIT_TOP_P, \
    EDIT_SEED, EDIT_BLOCKS = range(9)


def _bits(x, dtype):
    return jax.lax.bitcast_convert_type(x, dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillBatch:
    """`prefill_rows` chunks: tokens, positions, valid, `next_ids` (each position's following
    prompt token, -1 where none) `[P, C]`; per row its slot (the slot count: padding), its
    last valid index, whether it finishes its prompt, and `resume` (after a preemption: the
    token the row resumes with, else -1)."""

    tokens: np.ndarray
    positions: np.ndarray
    valid: np.ndarray
    next_ids: np.ndarray
    slot: np.ndarray
    last: np.ndarray
    finishes: np.ndarray
    resume: np.ndarray


def _sampled(logits, tokens, tokens_only: bool = False):
    """int32 `[B, 2 + 2 K]` of float32 logits `[B, V]` and the tokens sampled from them: per
    row the token, its log-probability, the K = `TOP_LOGPROBS` best ids and their
    log-probabilities (floats as their bits: one transfer to the host; `unpack_sampled`);
    `tokens_only`: the tokens alone, `[B, 1]`."""
    if tokens_only:
        return tokens[:, None]
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)
    top_logp, top_ids = jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1]))
    return jnp.concatenate([tokens[:, None], _bits(chosen, jnp.int32), top_ids,
                            _bits(top_logp, jnp.int32)], axis=1)


def _pool(cache: PagedKVCache):
    """What the runner keeps of a paged cache: its pages and their summaries."""
    return cache.pages, cache.summaries


def unpack_sampled(rows: np.ndarray):
    """(tokens, their log-probabilities, the best ids, their log-probabilities) of
    `_sampled`'s rows, on the host (NaN and no alternatives where it took the tokens only)."""
    if rows.shape[1] == 1:  # a NaN log-probability (its bits) and no alternatives
        rows = np.pad(rows, ((0, 0), (0, 1)), constant_values=np.float32(np.nan).view(np.int32))
    k = (rows.shape[1] - 2) // 2
    return rows[:, 0], rows[:, 1].view(np.float32), rows[:, 2:2 + k], rows[:, 2 + k:].view(np.float32)


class Runner:
    """The device state and programs of an engine over `decoder` (see the module docstring)."""

    def __init__(self, decoder: Decoder, *, max_slots: int, max_len: int, page_size: int,
                 prefill_rows: int, prefill_chunk: int, buckets: tuple[int, ...],
                 eos_ids: tuple[int, ...], decode_variants: bool | None = None):
        """`decode_variants`: two decode steps per bucket, the host choosing (default on a GPU,
        where a `lax.cond` reads its predicate on the host): one for steps whose rows are all
        greedy and want no log-probabilities (an argmax, nothing else), one for the rest; else
        one step that decides on the device whether to sort."""
        self.decoder, self.config = decoder, decoder.config
        self.max_slots, self.max_len, self.page_size = max_slots, max_len, page_size
        self.prefill_rows, self.prefill_chunk, self.buckets = prefill_rows, prefill_chunk, buckets
        self.pages_per_seq = -(-max_len // page_size)
        self.eos_ids = np.asarray(eos_ids or (-1,), np.int32)
        if decode_variants is None:
            decode_variants = jax.default_backend() == "gpu"
        self.decode_variants = (True, False) if decode_variants else (None,)
        sparse = decoder.plan_for_batch is not None  # routers, or page sparsity alone
        self.plans = {b: decoder.plan_for_batch(b) if sparse else None for b in buckets}
        self.summaries = decoder.page_sparse  # the pool keeps page summaries
        # The weights and routers as flat lists: a call flattens a list of arrays in C++, the
        # model's nested state (hundreds of variables) only in Python.
        self._weights, self._weights_def = jax.tree.flatten(decoder.state)
        self._routers, self._routers_def = jax.tree.flatten(decoder.router_state)
        self.transfers = 0  # explicit host-to-device transfers, since the start
        self.decode_calls: collections.Counter[int] = collections.Counter()  # by bucket, served
        self.pool = self.slots = None  # the pages and their summaries (None without)
        self.num_pages = 0
        self.prefill_program = jax.jit(self._prefill_program, static_argnames=("echo",),
                                       donate_argnames=("pool", "slots"))
        self.decode_program = jax.jit(self._decode_program,
                                      static_argnames=("bucket", "plan", "tokens_only"),
                                      donate_argnames=("pool", "slots"))
        self.edit_program = jax.jit(self._edit_program, donate_argnames=("slots",))

    # -- memory ------------------------------------------------------------------------------

    def transient_bytes(self) -> int:
        """An upper estimate of the largest program's buffers besides the weights and the pool,
        per device: prefill's activations over `prefill_rows` x `prefill_chunk` tokens (float32
        projections and MLP, a layer's keys and values gathered per row, the attention mask and
        its bias, the logits, all positions' with `echo`), or the decode step's over the slots
        (the XLA attention's gathered cache where no kernel runs)."""
        c, tp = self.config, tp_size(self.decoder.mesh)
        item = jnp.dtype(self.decoder.dtype).itemsize
        span = self.pages_per_seq * self.page_size
        width = 4 * (8 * c.hidden_size + (3 * c.mlp_dim + (c.num_heads + 2 * c.num_kv_heads)
                                          * c.head_dim) // tp)
        rows, tokens = self.prefill_rows, self.prefill_rows * self.prefill_chunk
        gathered = 2 * c.num_kv_heads // tp * span * c.head_dim * item
        prefill = (tokens * width + 2 * rows * gathered + tokens * span * (1 + 4 * c.num_heads
                                                                            // tp)
                   + 3 * tokens * c.vocab_size * 4)
        decode = self.max_slots * (width + 4 * 4 * c.vocab_size + 2 * gathered)
        return int(1.25 * max(prefill, decode)) + 256 * 2**20

    def plan_memory(self, kv_pages: int | None, fraction: float) -> MemoryPlan:
        """The pool's pages from what this device has free now (the weights loaded): on a GPU
        the allocator's limit less what is in use, on a CPU `fraction` of the free memory."""
        device = min(jax.tree.leaves(self.decoder.state)[0].devices(), key=lambda d: d.id)
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            budget = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        else:
            budget = int(fraction * (available_bytes(device) or 0))
        page_bytes = PagedKVCache.page_bytes(self.config, self.page_size, self.decoder.dtype,
                                             self.summaries)
        return plan_pages(budget=budget, transient=self.transient_bytes(),
                          page_bytes=page_bytes // tp_size(self.decoder.mesh),
                          page_size=self.page_size, max_len=self.max_len,
                          max_pages=self.max_slots * self.pages_per_seq, kv_pages=kv_pages)

    def allocate(self, num_pages: int) -> None:
        """The pool of `num_pages` pages and empty slots, placed as every program's outputs
        are (an uncommitted first pool would make warm-up compile a variant that serving never
        calls): on the weights' device, or by KV group over the model's devices."""
        abstract = PagedKVCache.abstract(self.config, num_pages, self.page_size, self.max_slots,
                                         self.pages_per_seq, self.decoder.dtype,
                                         self.summaries)
        mesh = self.decoder.mesh
        placement = (jax.tree.leaves(self.decoder.state)[0].sharding if mesh is None
                     else kv_cache_shardings(abstract, mesh).pages)
        pool = (abstract.pages, abstract.summaries)
        if mesh is not None:
            placement = (placement, None if abstract.summaries is None
                         else kv_cache_shardings(abstract, mesh).summaries)
        self.pool = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), pool),
                            out_shardings=placement)()
        self.num_pages = num_pages
        S, P = self.max_slots, self.pages_per_seq
        self.slots = self._put(Slots(
            tokens=np.zeros(S, np.int32), positions=np.zeros(S, np.int32),
            active=np.zeros(S, bool), end=np.zeros(S, np.int32),
            temperature=np.zeros(S, np.float32), top_k=np.zeros(S, np.int32),
            top_p=np.ones(S, np.float32), seeds=np.zeros(S, np.uint32),
            block_table=np.full((S, P), num_pages, np.int32)))

    def release(self) -> None:
        self.pool = self.slots = None

    def _put(self, tree):
        """One explicit host-to-device transfer of `tree`, replicated beside the slots."""
        self.transfers += 1
        if self.decoder.mesh is None:
            return jax.device_put(tree, jax.tree.leaves(self.decoder.state)[0].sharding)
        return jax.device_put(tree, jax.sharding.NamedSharding(self.decoder.mesh,
                                                               jax.sharding.PartitionSpec()))

    # -- the programs ------------------------------------------------------------------------

    def _is_eos(self, tokens):
        return jnp.isin(tokens, jnp.asarray(self.eos_ids))

    def _edit_program(self, slots: Slots, edits) -> Slots:
        """`slots` with the rows of `edits` int32 `[E, EDIT_BLOCKS + pages_per_seq]` rewritten
        (the columns `EDIT_*`)."""
        source = edits[:, EDIT_SOURCE]
        has = source >= 0
        old = slots.rows(jnp.maximum(source, 0))
        new = Slots(tokens=jnp.where(has, old.tokens, 0),
                    positions=jnp.where(has, old.positions, 0),
                    active=(edits[:, EDIT_KEEP] > 0) & has & old.active, end=edits[:, EDIT_END],
                    temperature=_bits(edits[:, EDIT_TEMPERATURE], jnp.float32),
                    top_k=edits[:, EDIT_TOP_K], top_p=_bits(edits[:, EDIT_TOP_P], jnp.float32),
                    seeds=_bits(edits[:, EDIT_SEED], jnp.uint32),
                    block_table=edits[:, EDIT_BLOCKS:])
        target = edits[:, EDIT_TARGET]
        return jax.tree.map(lambda x, row: x.at[target].set(row, mode="drop"), slots, new)

    def _prefill_program(self, weights, pool, slots: Slots, batch: PrefillBatch, *, echo: bool):
        """The chunks written into their pages; each row's next token sampled after its last
        one; rows finishing their prompt put it (or their `resume` token) into their slot,
        which decodes from there. Returns (the sampled tokens with their log-probabilities
        and alternatives, `_sampled`; with `echo` each position's log-probability of its next
        prompt token and the alternatives), the slots, the pool."""
        model = nnx.merge(self.decoder.graphdef, jax.tree.unflatten(self._weights_def, weights))
        padding = batch.slot >= self.max_slots
        rows = slots.rows(jnp.minimum(batch.slot, self.max_slots - 1))
        block_table = jnp.where(padding[:, None], self.num_pages, rows.block_table)
        out = model.forward(batch.tokens, batch.positions, ChunkOps(batch.positions, batch.valid),
                            PagedKVCache(pool[0], block_table, pool[1]))
        index = jnp.arange(batch.tokens.shape[0])
        logits = model.logits(out.hidden_states[index, batch.last])
        position = batch.positions[index, batch.last] + 1
        first = sample_rows(logits, rows.sampling(), rows.seeds, position, self.decoder.mesh)
        prompt_logp = None
        if echo:
            logp = jax.nn.log_softmax(model.logits(out.hidden_states), axis=-1)
            following = jnp.maximum(batch.next_ids, 0)[..., None]
            prompt_logp = (jnp.take_along_axis(logp, following, -1)[..., 0],
                           *jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1]))[::-1])
        resumed = batch.resume >= 0
        target = jnp.where(batch.finishes & ~padding, batch.slot, self.max_slots)
        active = (position < rows.end) & (resumed | ~self._is_eos(first))
        slots = slots.replace(
            tokens=slots.tokens.at[target].set(jnp.where(resumed, batch.resume, first), mode="drop"),
            positions=slots.positions.at[target].set(position, mode="drop"),
            active=slots.active.at[target].set(active, mode="drop"))
        return (_sampled(logits, first), prompt_logp), slots, _pool(out.kv_cache)

    def _decode_program(self, weights, routers, pool, slots: Slots, *, bucket: int, plan,
                        tokens_only: bool | None):
        """One `decode_step` over slots `[0, bucket)`: the next tokens with their
        log-probabilities and alternatives (`_sampled`); the slots advanced (stopped at EOS
        and `end`); the pool. `tokens_only`: True, every row is greedy and wants no
        log-probabilities (the step takes an argmax and returns the tokens alone); False, some
        row samples or wants them (every row through the sampler, greedy rows taking their
        argmax there); decided on the host, which knows every row's settings, so that no
        `lax.cond` makes a GPU wait for the logits before the call returns. None: whether to
        sort is decided on the device."""
        model = nnx.merge(self.decoder.graphdef, jax.tree.unflatten(self._weights_def, weights))
        routers = jax.tree.unflatten(self._routers_def, routers)
        rows = slots.rows(slice(0, bucket))
        mesh = self.decoder.mesh
        sample = lambda logits: sample_rows(logits, rows.sampling(), rows.seeds,
                                             rows.positions + 1, mesh, all_greedy=tokens_only)
        step = decode_step(model, DecodeState(rows.tokens, rows.positions, rows.active,
                                              PagedKVCache(pool[0], rows.block_table, pool[1])),
                           sample, routers, plan, mesh)
        after = step.state
        active = after.active & (after.positions < rows.end) & ~self._is_eos(step.next_tokens)
        slots = slots.replace(tokens=slots.tokens.at[:bucket].set(after.tokens),
                              positions=slots.positions.at[:bucket].set(after.positions),
                              active=slots.active.at[:bucket].set(active))
        return (_sampled(step.logits, step.next_tokens, bool(tokens_only)), slots,
                _pool(after.kv_cache))

    # -- dispatch (asynchronous: each returns the device outputs, not yet read) ---------------

    def edit(self, edits: list[SlotEdit]) -> None:
        """Rewrites the rows of `edits` (one per slot at most), in one transfer."""
        rows = np.zeros((self.max_slots, EDIT_BLOCKS + self.pages_per_seq), np.int32)
        rows[:, EDIT_TARGET], rows[:, EDIT_SOURCE] = self.max_slots, -1
        rows[:, EDIT_BLOCKS:] = self.num_pages
        for i, edit in enumerate(edits):
            row, sequence = rows[i], edit.sequence
            row[EDIT_TARGET], row[EDIT_SOURCE] = edit.slot, edit.source
            if sequence is not None:
                temperature, top_k, top_p, seed = sequence.sampling
                row[EDIT_KEEP], row[EDIT_END], row[EDIT_TOP_K] = 1, sequence.end, top_k
                row[[EDIT_TEMPERATURE, EDIT_TOP_P]] = np.float32([temperature, top_p]).view(np.int32)
                row[EDIT_SEED] = np.uint32(seed).view(np.int32)
                row[EDIT_BLOCKS:EDIT_BLOCKS + len(sequence.pages)] = sequence.pages
        self.slots = self.edit_program(self.slots, self._put(rows))

    def prefill(self, chunks: list[PrefillChunk], echo: bool):
        """Dispatches the prefill of `chunks` (at most `prefill_rows`); its outputs."""
        P, C, S = self.prefill_rows, self.prefill_chunk, self.max_slots
        batch = PrefillBatch(tokens=np.zeros((P, C), np.int32),
                             positions=np.tile(np.arange(C, dtype=np.int32), (P, 1)),
                             valid=np.zeros((P, C), bool), next_ids=np.full((P, C), -1, np.int32),
                             slot=np.full(P, S, np.int32), last=np.zeros(P, np.int32),
                             finishes=np.zeros(P, bool), resume=np.full(P, -1, np.int32))
        for i, chunk in enumerate(chunks):
            sequence, start, n = chunk.sequence, chunk.start, chunk.length
            batch.tokens[i, :n] = sequence.prefill_ids[start:start + n]
            following = sequence.prompt[start + 1:start + n + 1]
            batch.next_ids[i, :len(following)] = following
            batch.valid[i, :n] = True
            batch.positions[i] += start
            batch.slot[i], batch.last[i], batch.finishes[i] = sequence.slot, n - 1, chunk.finishes
            if chunk.finishes and sequence.resumed:
                batch.resume[i] = sequence.generated[-1]
        out, self.slots, self.pool = self.prefill_program(
            self._weights, self.pool, self.slots, self._put(batch), echo=echo)
        return out

    def decode(self, bucket: int, tokens_only: bool = True):
        """Dispatches one decode step over slots `[0, bucket)` (`tokens_only`: every decoding
        row is greedy and wants no log-probabilities); its outputs."""
        out, self.slots, self.pool = self.decode_program(
            self._weights, self._routers, self.pool, self.slots, bucket=bucket,
            plan=self.plans[bucket],
            tokens_only=tokens_only if self.decode_variants != (None,) else None)
        self.decode_calls[bucket] += 1
        return out

    def warm_up(self, progress: Callable[[str], None] | None = None) -> int:
        """Compiles every program the engine can call by running it on empty slots (both
        prefill variants, the decode step per bucket, the edit); returns how many.
        `progress(line)` hears of each: its name, "(i of N)" and its seconds."""
        programs = [("prefill", lambda: self.prefill([], False)),
                    ("prefill with echo", lambda: self.prefill([], True))]
        for bucket in self.buckets:
            plan = self.plans[bucket]
            detail = "" if plan is None else f", MLP k for up to {bucket} sequences"
            for tokens_only in self.decode_variants:
                programs.append((f"decode step (batch {bucket}{detail}"
                                 f"{', sampling and log-probabilities' if tokens_only is False else ''})",
                                 lambda bucket=bucket, only=tokens_only: self.decode(bucket, only)))
        programs.append(("slot edit", lambda: self.edit([])))
        for i, (name, run) in enumerate(programs):
            start = time.perf_counter()
            jax.block_until_ready(run())
            if progress is not None:
                progress(f"{name} ({i + 1} of {len(programs)}) in "
                         f"{time.perf_counter() - start:.1f} s")
        self.decode_calls.clear()
        return len(programs)
