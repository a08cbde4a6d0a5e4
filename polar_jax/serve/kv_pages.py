"""The serving engine's KV pages: the host-side page allocator and the memory plan that sizes
the device's page pool before anything large is allocated.

Pure Python and numpy (no device work): the engine asks `plan_pages` how many pages fit, then
allocates one `PagedKVCache` pool of that many pages per layer; its scheduler hands pages to
sequences with a `PagePool` as their tokens fill them, and finds a new prompt's cached prefix
by `page_hashes`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

from polar_jax.errors import PolarJaxError
from polar_jax.memory import GiB

DEFAULT_PAGE_SIZE = 16  # tokens a page (H100, llama-3-8b shapes: docs/BENCHMARKS.md)
DEFAULT_GPU_MEMORY_FRACTION = 0.9


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` positions."""
    return -(-tokens // page_size)


def page_hashes(tokens, page_size: int, count: int) -> list[bytes]:
    """The prefix hashes of the first `count` full pages of `tokens`: page i's hash covers
    every token of pages 0..i (a chain, as vLLM's block hashes), so equal hashes mean equal
    prefixes, and so equal keys and values."""
    hashes, parent = [], b""
    for i in range(count):
        page = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()
        parent = hashlib.blake2b(parent + page, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class PagePool:
    """The pool's pages on the host: each is free, held (by one or more sequences, counted),
    or cached: free, but still holding a full page of prefill whose prefix hash is known, so a
    later request with the same prefix takes it instead of computing it again (prefix caching;
    `prefix_cache=False` keeps no hashes). A fresh page is a never-hashed free page if there is
    one, else the least recently released cached page (evicted: its hash forgotten). A held
    page is never evicted."""

    def __init__(self, num_pages: int, prefix_cache: bool = True):
        self.num_pages = num_pages
        self.prefix_cache = prefix_cache
        self._plain = list(range(num_pages - 1, -1, -1))  # a stack: pop() gives the lowest
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._refs = [0] * num_pages
        self._hash_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}

    @property
    def free(self) -> int:
        """Pages a request may take: never-hashed free pages and cached ones."""
        return len(self._plain) + len(self._cached)

    @property
    def used(self) -> int:
        return self.num_pages - self.free

    @property
    def cached(self) -> int:
        return len(self._cached)

    def allocate(self, count: int) -> list[int]:
        """`count` fresh pages (held once), or a `PolarJaxError` (nothing taken) when fewer
        are free."""
        if count > self.free:
            raise PolarJaxError(f"{count} KV pages asked, {self.free} free")
        pages = []
        for _ in range(count):
            if self._plain:
                page = self._plain.pop()
            else:
                page, _ = self._cached.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached pages of the longest run of `hashes` from the first, each now held once
        more (taken out of the eviction order while held)."""
        pages = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._cached[page]
            self._refs[page] += 1
            pages.append(page)
        return pages

    def contains(self, h: bytes) -> bool:
        return h in self._page_of

    def commit(self, page: int, h: bytes) -> None:
        """Held `page` now holds the full page of prefix hash `h` (its keys and values are
        written by the programs dispatched so far). A second page of the same prefix stays
        unhashed."""
        if self.prefix_cache and h not in self._page_of and page not in self._hash_of:
            self._page_of[h], self._hash_of[page] = page, h

    def release(self, pages: list[int]) -> None:
        """Drops one hold of each page; a page no longer held becomes cached (if hashed; the
        later pages of a sequence are evicted before its first) or free."""
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._cached[page] = None
                else:
                    self._plain.append(page)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device: the budget the pool is cut from (what the allocator may still hand
    out after the weights), the largest program's transient buffers, one page over every
    layer; and the pages that fit."""

    budget: int
    transient: int
    page_bytes: int
    num_pages: int

    def describe(self) -> str:
        return (f"{self.num_pages} KV pages of {self.page_bytes / 2**20:.2f} MiB "
                f"({self.num_pages * self.page_bytes / GiB:.2f} GiB) beside "
                f"{self.transient / GiB:.2f} GiB of program buffers, out of "
                f"{self.budget / GiB:.2f} GiB free")


def plan_pages(*, budget: int, transient: int, page_bytes: int, page_size: int, max_len: int,
               max_pages: int, kv_pages: int | None = None) -> MemoryPlan:
    """The page pool: `kv_pages` if given, else as many pages as fit in `budget` after the
    `transient` buffers (at most `max_pages`: every slot at `max_len`). Refuses, in one line
    with the numbers, a pool that cannot hold one request of `max_len` positions, or a
    `kv_pages` that does not fit."""
    need = pages_for(max_len, page_size)
    room = max(0, budget - transient) // page_bytes
    if kv_pages is not None:
        if kv_pages > room:
            raise PolarJaxError(
                f"--kv-pages {kv_pages} needs {kv_pages * page_bytes / GiB:.2f} GiB beside "
                f"{transient / GiB:.2f} GiB of program buffers, but {budget / GiB:.2f} GiB are "
                f"free (room for {room} pages); lower --kv-pages, --max-slots or --prefill-chunk")
        num_pages = kv_pages
    else:
        num_pages = min(room, max_pages)
    if num_pages < need:
        raise PolarJaxError(
            f"the KV page pool holds {num_pages} pages of {page_size} tokens but one request of "
            f"--max-len {max_len} positions needs {need} ({need * page_bytes / GiB:.2f} GiB beside "
            f"{transient / GiB:.2f} GiB of program buffers; {budget / GiB:.2f} GiB free); lower "
            f"--max-len, --prefill-chunk or --prefill-rows, or give more memory "
            f"(--gpu-memory-fraction, --kv-pages)")
    return MemoryPlan(budget, transient, page_bytes, num_pages)
