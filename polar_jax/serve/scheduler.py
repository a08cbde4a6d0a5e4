"""The serving schedule: which requests hold slots and pages, and what each iteration
prefills and decodes. Pure Python (no JAX): the engine's thread asks `Scheduler.schedule()`
for an iteration's work, dispatches it to the device, and reports the tokens it reads back,
one iteration later, with `Scheduler.finish` for the sequences that ended.

The view is exact in everything deterministic (positions, pages, tokens sampled so far) and one
iteration late in token values: the device stops a sequence itself at EOS, `max_tokens` and
the context, and the host learns of an EOS one iteration after it happened (the sequence then
keeps its slot and pages one iteration longer).

Per iteration, in order:
1. Pages: every decoding sequence whose next token starts a page gets one; when none is free
   the newest running sequence is preempted (its pages freed; it is recomputed when admitted
   again, from its prompt and the tokens it had). A preemption needs every token of its victim
   seen, so `schedule` returns None while some are in flight: the engine catches up and asks
   again.
2. Admission, first come first served, while a slot and the pages of the prompt (and its first
   new token) are free. Full pages of the prompt whose prefix is cached are taken from the pool
   instead of being computed (prefix caching, `kv_pages.page_hashes`); a request whose next
   page is being computed by a running request waits for it.
3. Prefill: up to `prefill_rows` chunks of at most `prefill_chunk` tokens, oldest sequence
   first, within a token budget (`max_batched_tokens` less the decoding sequences), so a long
   prompt stalls decoding by one budget at most. A page of prefill, once full, is given to the
   prefix cache.
4. Decode: one step over every decoding sequence, in the smallest batch bucket that holds the
   occupied slots (slots are kept packed from 0: a freed slot takes the highest one's sequence).
Slots whose contents changed (admitted, moved, grown, freed) are listed as `SlotEdit`s for the
device.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from polar_jax.serve.kv_pages import PagePool, page_hashes, pages_for


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request as the schedule sees it. `prompt`, `max_tokens`, `echo` (no cached prefix:
    its prompt's log-probabilities are computed), `sampling` (opaque to the schedule: the
    device row's temperature, top_k, top_p, seed) and `payload` (the engine's) are given; the
    rest is the schedule's.

    - `prefill_ids`: the tokens to prefill: the prompt, or after a preemption the prompt and
      every generated token but the last; `computed` of them are written (or dispatched);
      `committed` of its full pages are in the prefix cache (`hashes`: their prefix hashes).
    - `sampled`: tokens whose sampling is dispatched; `generated`: the token ids read back.
    - `position`: where its next decode step writes; `decoding` while the device decodes it
      (until `end`: the last position a token is written at, exclusive).
    - `slot`, and `device_slot`: the slot whose device row holds its latest token;
      `admissions`: how often it was admitted (work dispatched before a preemption is stale).
    """

    prompt: tuple[int, ...]
    max_tokens: int
    echo: bool = False
    sampling: tuple = ()
    payload: Any = None
    slot: int = -1
    device_slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    prefill_ids: tuple[int, ...] = ()
    hashes: list[bytes] = dataclasses.field(default_factory=list)
    computed: int = 0
    committed: int = 0
    sampled: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)
    position: int = 0
    end: int = 0
    decoding: bool = False
    finished: bool = False
    admissions: int = 0

    @property
    def resumed(self) -> bool:
        """Admitted again after a preemption: its prefill samples no new token."""
        return bool(self.generated)

    @property
    def unseen(self) -> int:
        """Tokens sampled on the device that the host has not read yet."""
        return self.sampled - len(self.generated)


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """`length` tokens of `sequence.prefill_ids` from `start`; `finishes`: its last."""

    sequence: Sequence
    start: int
    length: int
    finishes: bool


@dataclasses.dataclass(frozen=True)
class SlotEdit:
    """A device row to rewrite: `sequence` now in `slot` (None: the slot is free). `source`:
    the row whose latest token and position it keeps (-1: none yet, a new sequence)."""

    slot: int
    sequence: Sequence | None
    source: int


@dataclasses.dataclass(frozen=True)
class Iteration:
    """One iteration's work, dispatched in this order: the edits, the prefill chunks, the
    decode step over slots `[0, bucket)` (`decode`: the sequences it samples for, by slot)."""

    edits: list[SlotEdit]
    prefill: list[PrefillChunk]
    decode: dict[int, Sequence]
    bucket: int

    @property
    def empty(self) -> bool:
        return not (self.edits or self.prefill or self.decode)


@dataclasses.dataclass
class PrefixStats:
    """Prompt tokens admitted (`queries`) and those found in the prefix cache (`hits`)."""

    queries: int = 0
    hits: int = 0


class Scheduler:
    """See the module docstring. `buckets`: the decode step's batch sizes, ascending, the
    last `num_slots`."""

    def __init__(self, *, num_slots: int, pool: PagePool, page_size: int, max_len: int,
                 prefill_rows: int, prefill_chunk: int, max_batched_tokens: int,
                 buckets: tuple[int, ...]):
        if pool.num_pages < pages_for(max_len, page_size):  # a preempted one could never return
            raise ValueError(f"a pool of {pool.num_pages} pages cannot hold one sequence of "
                             f"{max_len} positions")
        self.num_slots, self.pool, self.page_size, self.max_len = num_slots, pool, page_size, max_len
        self.prefill_rows, self.prefill_chunk = prefill_rows, prefill_chunk
        self.max_batched_tokens, self.buckets = max_batched_tokens, buckets
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.slots: list[Sequence | None] = [None] * num_slots
        self._dirty: set[int] = set()
        self.prefix = PrefixStats()
        self.preemptions = 0

    # -- events -------------------------------------------------------------------------------

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def finish(self, sequence: Sequence) -> None:
        """`sequence` ended (or was cancelled): its slot and pages are freed."""
        sequence.finished = True
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        self._release(sequence)

    @property
    def pending(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the iteration ------------------------------------------------------------------------

    def schedule(self) -> Iteration | None:
        """The next iteration's work (see the module docstring), or None when a preemption
        needs the tokens in flight read first."""
        if not self._grow_pages():
            return None
        self._admit()
        decoding = sum(s.decoding and s.position < s.end for s in self.running)
        prefill = self._prefill_chunks(self.max_batched_tokens - decoding)
        decode = {s.slot: s for s in self.running if s.decoding and s.position < s.end}
        for sequence in decode.values():
            sequence.position += 1
            sequence.sampled += 1
        edits = []
        for slot in sorted(self._dirty):
            sequence = self.slots[slot]
            edits.append(SlotEdit(slot, sequence, -1 if sequence is None else sequence.device_slot))
            if sequence is not None:
                sequence.device_slot = slot
        self._dirty.clear()
        occupied = sum(s is not None for s in self.slots)
        bucket = next(b for b in self.buckets if b >= occupied) if decode else 0
        return Iteration(edits, prefill, decode, bucket)

    def _grow_pages(self) -> bool:
        for sequence in list(self.running):
            if not (sequence.decoding and sequence.position < sequence.end
                    and sequence.position >= len(sequence.pages) * self.page_size):
                continue
            while self.pool.free == 0 and sequence.slot >= 0:
                victim = self.running[-1]
                if victim.unseen:
                    return False
                self._preempt(victim)
            if sequence.slot >= 0:
                sequence.pages += self.pool.allocate(1)
                self._dirty.add(sequence.slot)
        return True

    def _admit(self) -> None:
        while self.waiting:
            sequence = self.waiting[0]
            slot = next((i for i, s in enumerate(self.slots) if s is None), None)
            if slot is None:
                return
            ids = sequence.prompt + tuple(sequence.generated[:-1])
            if len(sequence.prefill_ids) != len(ids):
                # Full pages before the last token: its logits are computed, so it is never in
                # a shared page.
                sequence.prefill_ids = ids
                sequence.hashes = (page_hashes(ids, self.page_size, (len(ids) - 1) // self.page_size)
                                   if self.pool.prefix_cache and not sequence.echo else [])
            cached = self.pool.match(sequence.hashes)
            computing = {h for s in self.running for h in s.hashes[s.committed:]}
            following = sequence.hashes[len(cached):len(cached) + 1]
            need = pages_for(len(ids) + 1, self.page_size) - len(cached)
            if (following and following[0] in computing) or need > self.pool.free:
                self.pool.release(cached)
                return
            self.waiting.popleft()
            sequence.pages = cached + self.pool.allocate(need)
            sequence.computed = sequence.committed = len(cached)
            sequence.computed *= self.page_size
            sequence.end = min(len(sequence.prompt) + sequence.max_tokens, self.max_len) - 1
            sequence.slot, sequence.device_slot = slot, -1
            sequence.admissions += 1
            self.slots[slot] = sequence
            self.running.append(sequence)
            self._dirty.add(slot)
            self.prefix.queries += len(ids)
            self.prefix.hits += sequence.computed

    def _prefill_chunks(self, budget: int) -> list[PrefillChunk]:
        chunks = []
        budget = min(budget, self.prefill_rows * self.prefill_chunk)
        for sequence in self.running:
            if len(chunks) == self.prefill_rows or budget <= 0:
                break
            ids = sequence.prefill_ids
            if sequence.computed >= len(ids):
                continue
            length = min(self.prefill_chunk, len(ids) - sequence.computed, budget)
            budget -= length
            chunk = PrefillChunk(sequence, sequence.computed, length,
                                 sequence.computed + length == len(ids))
            chunks.append(chunk)
            sequence.computed += length
            while (sequence.committed < len(sequence.hashes)
                   and (sequence.committed + 1) * self.page_size <= sequence.computed):
                self.pool.commit(sequence.pages[sequence.committed],
                                 sequence.hashes[sequence.committed])
                sequence.committed += 1
            if chunk.finishes:
                sequence.decoding, sequence.position = True, len(ids)
                sequence.sampled += not sequence.resumed
        return chunks

    # -- slots and pages ----------------------------------------------------------------------

    def _release(self, sequence: Sequence) -> None:
        """Frees `sequence`'s slot (the highest occupied slot's sequence moves into it) and
        pages."""
        slot = sequence.slot
        if slot >= 0 and self.slots[slot] is sequence:
            self.slots[slot] = None
            self.running.remove(sequence)
            self._dirty.add(slot)
            top = max((i for i, s in enumerate(self.slots) if s is not None), default=-1)
            if top > slot:
                mover = self.slots[top]
                self.slots[top], self.slots[slot], mover.slot = None, mover, slot
                self._dirty.add(top)
        self.pool.release(sequence.pages)
        sequence.pages, sequence.slot, sequence.decoding = [], -1, False

    def _preempt(self, sequence: Sequence) -> None:
        """Frees `sequence`'s slot and pages and puts it first in the queue: admitted again, it
        prefills its prompt and tokens so far and resumes where it stopped."""
        self._release(sequence)
        sequence.computed = sequence.committed = 0
        sequence.prefill_ids, sequence.hashes = (), []
        self.waiting.appendleft(sequence)
        self.preemptions += 1
