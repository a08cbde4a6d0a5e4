"""The serving engine's KV pages: the host-side page allocator and the memory plan that sizes
the device's page pool before anything large is allocated.

Pure Python and numpy (no device work): the engine asks `plan_pages` how many pages fit, then
allocates one `PagedKVCache` pool of that many pages per layer, and hands pages to sequences
with a `PagePool` as their tokens fill them.
"""

from __future__ import annotations

import dataclasses

from polar_jax.errors import PolarJaxError
from polar_jax.memory import GiB

DEFAULT_PAGE_SIZE = 16  # tokens a page (H100, llama-3-8b shapes: docs/BENCHMARKS.md)
DEFAULT_GPU_MEMORY_FRACTION = 0.9


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` positions."""
    return -(-tokens // page_size)


class PagePool:
    """Which of `num_pages` pages are free. Pages are handed out lowest id first and returned
    in any order; the engine keeps each sequence's list (its block table row)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() gives the lowest

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, count: int) -> list[int]:
        """`count` pages, or a `PolarJaxError` (nothing taken) when fewer are free."""
        if count > len(self._free):
            raise PolarJaxError(f"{count} KV pages asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


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
