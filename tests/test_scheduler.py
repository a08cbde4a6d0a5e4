"""The serving scheduler without a model (pure Python): admission order, the token budget,
page growth and preemption order, slot packing and batch buckets, the edits sent to the
device, and prefix caching over a sequence of events. The engine tests check the same schedule
against real tokens."""

from __future__ import annotations

import random

import pytest

from polar_jax.serve.kv_pages import PagePool, page_hashes
from polar_jax.serve.scheduler import Scheduler, Sequence

pytestmark = pytest.mark.quick


def _scheduler(pages=64, slots=4, page_size=4, max_len=64, rows=2, chunk=8, budget=None,
               prefix_cache=True):
    return Scheduler(num_slots=slots, pool=PagePool(pages, prefix_cache), page_size=page_size,
                     max_len=max_len, prefill_rows=rows, prefill_chunk=chunk,
                     max_batched_tokens=budget or rows * chunk + slots,
                     buckets=tuple(b for b in (1, 2, 4, 8) if b < slots) + (slots,))


def _read(scheduler, iteration):
    """What the engine does with an iteration's tokens: each sampled token appended (random
    ids, never EOS), the sequences at `max_tokens` or the context finished."""
    sampled = [c.sequence for c in iteration.prefill if c.finishes and not c.sequence.resumed]
    for sequence in sampled + list(iteration.decode.values()):
        if sequence.finished:
            continue
        sequence.generated.append(random.randrange(1000))
        if (len(sequence.generated) == sequence.max_tokens
                or len(sequence.prompt) + len(sequence.generated) >= scheduler.max_len):
            scheduler.finish(sequence)


def _prompt(n):
    return tuple(random.randrange(1000) for _ in range(n))


def test_first_come_first_served_into_packed_slots_and_the_smallest_bucket():
    s = _scheduler(slots=4, page_size=16)
    alone = Sequence(_prompt(3), 5)
    s.add(alone)
    first = s.schedule()
    assert [c.sequence for c in first.prefill] == [alone] and first.prefill[0].finishes
    # A request alone decodes in the smallest bucket, from the iteration its prompt ends.
    assert first.decode == {0: alone} and first.bucket == 1
    assert [(e.slot, e.sequence, e.source) for e in first.edits] == [(0, alone, -1)]
    _read(s, first)
    quiet = s.schedule()  # nothing changed: nothing is sent to the device
    assert quiet.edits == [] and quiet.prefill == [] and quiet.bucket == 1
    _read(s, quiet)
    others = [Sequence(_prompt(3), 20) for _ in range(5)]
    for sequence in others:
        s.add(sequence)
    step = s.schedule()
    assert [sq.slot for sq in others] == [1, 2, 3, -1, -1]  # in arrival order; two wait
    assert list(s.waiting) == others[3:] and step.bucket == 4
    assert [c.sequence for c in step.prefill] == others[:2]  # two prefill rows, oldest first


def test_a_freed_slot_takes_the_highest_slots_sequence_and_the_bucket_shrinks():
    s = _scheduler(slots=4)
    sequences = [Sequence(_prompt(3), 30) for _ in range(3)]
    for sequence in sequences:
        s.add(sequence)
    for _ in range(3):
        _read(s, s.schedule())
    assert [sq.slot for sq in sequences] == [0, 1, 2]
    assert all(sq.device_slot == sq.slot for sq in sequences)
    s.finish(sequences[0])
    step = s.schedule()
    assert sequences[2].slot == 0 and step.bucket == 2
    # Slot 0 takes slot 2's row (its latest token is on the device); slot 2 is cleared.
    assert [(e.slot, e.sequence, e.source) for e in step.edits] == [(0, sequences[2], 2),
                                                                     (2, None, -1)]
    assert set(step.decode) == {0, 1} and step.decode[0] is sequences[2]


def test_the_token_budget_bounds_prefill_beside_decoding_sequences():
    s = _scheduler(slots=4, rows=2, chunk=8, budget=4 + 6)
    decoding = [Sequence(_prompt(2), 50) for _ in range(4)]
    for sequence in decoding:
        s.add(sequence)
    while not all(sq.decoding for sq in decoding):  # two prompts an iteration
        _read(s, s.schedule())
    long = Sequence(_prompt(40), 5)
    s.finish(decoding[3])
    s.add(long)
    steps = 0
    while long.computed < len(long.prompt):
        step = s.schedule()
        steps += 1
        # Each iteration: the decoding sequences, and at most budget - decoding prompt tokens.
        assert len(step.decode) >= 3
        assert sum(c.length for c in step.prefill) <= 10 - 3
        _read(s, step)
    assert steps == -(-40 // 7)


def test_pages_grow_and_the_newest_is_preempted_once_its_tokens_are_read():
    """A pool of 6 pages of 4 tokens (one sequence of --max-len 24 fits) and two sequences
    that grow to the context."""
    s = _scheduler(pages=6, slots=3, page_size=4, max_len=24)
    old, new = Sequence(_prompt(6), 40), Sequence(_prompt(6), 40)
    s.add(old)
    s.add(new)
    step = s.schedule()  # 2 + 2 pages (prompt and the first new token)
    assert len(old.pages) == len(new.pages) == 2 and s.pool.free == 2
    in_flight = step
    for _ in range(40):
        step = s.schedule()
        if step is None:  # a preemption waits for the tokens in flight
            assert new.unseen
            _read(s, in_flight)
            step = s.schedule()
            assert step is not None
        if s.preemptions:
            break
        _read(s, in_flight)
        in_flight = step
    # The newest request was preempted: its pages back in the pool, first in the queue.
    assert s.preemptions == 1 and list(s.waiting) == [new] and new.slot == -1
    assert new.pages == [] and len(old.pages) == old.position // 4 + 1
    generated = list(new.generated)
    while new.slot < 0:
        _read(s, step)
        step = s.schedule()
    # Admitted again, it prefills its prompt and every token it had but the last, which is
    # its next input: no new token is sampled by that prefill.
    assert new.prefill_ids == new.prompt + tuple(generated[:-1])
    assert new.generated == generated


def test_prefix_pages_are_shared_cached_after_use_and_evicted_least_recent_first():
    page = 4
    s = _scheduler(pages=16, slots=3, page_size=page, rows=1, chunk=64)
    system = _prompt(12)
    a = Sequence(system + _prompt(3), 10)
    s.add(a)
    first = s.schedule()
    # 14 tokens before the last: 3 full pages go to the prefix cache at dispatch.
    assert [s.pool.contains(h) for h in a.hashes] == [True] * 3
    b = Sequence(system + _prompt(5), 2)
    s.add(b)
    _read(s, first)
    step = s.schedule()
    assert b.pages[:3] == a.pages[:3]  # shared, not computed again: b's chunk starts at 12
    assert [(c.sequence, c.start, c.length) for c in step.prefill] == [(b, 12, 5)]
    assert s.prefix.queries == 15 + 17 and s.prefix.hits == 12
    shared, own = b.pages[:3], b.pages[3]  # own: b's fourth page, full, hashed
    s.finish(a)  # the shared pages stay held by b
    assert s.pool.used == len(b.pages)
    s.finish(b)
    assert s.pool.cached == 3 + 1 and s.pool.used == 0
    # A fresh page is a never-hashed one first, then the least recently released cached
    # page: b released its last pages first, so its own page goes before the system prompt.
    plain = s.pool.free - s.pool.cached
    taken = s.pool.allocate(plain + 1)
    assert own in taken and not s.pool.contains(b.hashes[3])
    assert all(s.pool.contains(h) for h in b.hashes[:3])
    s.pool.release(taken)
    c = Sequence(system + _prompt(1), 2)
    s.add(c)
    s.schedule()
    assert c.pages[:3] == shared and s.prefix.hits == 24
    # Pages in use are never evicted: taking every free page leaves c's alone.
    taken = s.pool.allocate(s.pool.free)
    assert not set(taken) & set(c.pages)


def test_a_request_waits_for_the_prefix_page_a_running_request_is_computing():
    s = _scheduler(pages=32, slots=3, page_size=4, rows=2, chunk=4)
    system = _prompt(16)
    a, b = Sequence(system + (1,), 2), Sequence(system + (2,), 2)
    s.add(a)
    s.add(b)
    step = s.schedule()
    # a computes its first page; b's first page is that one: b waits rather than compute it.
    assert [c.sequence for c in step.prefill] == [a] and b.slot == -1
    for _ in range(4):
        _read(s, step)
        step = s.schedule()
    assert b.slot >= 0 and b.pages[:4] == a.pages[:4] and s.prefix.hits == 16


def test_echo_and_no_prefix_cache_compute_every_page():
    system = _prompt(16)
    for echo, cache in ((True, True), (False, False)):
        s = _scheduler(pages=32, slots=3, page_size=4, rows=1, chunk=32, prefix_cache=cache)
        a = Sequence(system + (1,), 10)
        s.add(a)
        _read(s, s.schedule())
        b = Sequence(system + (2,), 2, echo=echo)
        s.add(b)
        s.schedule()
        assert s.prefix.hits == 0 and not set(a.pages) & set(b.pages)


def test_a_pool_smaller_than_one_sequence_is_refused():
    with pytest.raises(ValueError, match="5 pages cannot hold one sequence of 24 positions"):
        _scheduler(pages=5, page_size=4, max_len=24)


def test_page_hashes_are_prefix_chains():
    tokens = _prompt(20)
    h = page_hashes(tokens, 4, 5)
    assert h[:3] == page_hashes(tokens[:13], 4, 3)
    changed = page_hashes((tokens[0] + 1,) + tokens[1:], 4, 5)
    assert all(x != y for x, y in zip(h, changed))  # a change in page 0 changes every hash
