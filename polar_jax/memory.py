"""The free-memory probe, and the one check every step that allocates large buffers (the
decoder's KV cache and prefill, evaluation's activations) makes before it allocates or
compiles. A leaf module: it imports nothing of the project but `polar_jax.errors`.
"""

from __future__ import annotations

import os

from polar_jax.errors import PolarJaxError

GiB = 2**30


def available_bytes(device) -> int | None:
    """Bytes free on `device`: its allocator's limit less what is in use (accelerators), else
    the host's available physical memory (CPU); None when neither is known."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(task: str, parts: dict[str, int], device, lower: str) -> None:
    """Refuses `task` in one line when its buffers `parts` (name: bytes) need more than
    `device` has free, naming the sizes in GiB and `lower`, what to lower."""
    needed = sum(parts.values())
    available = available_bytes(device)
    if available is not None and needed > available:
        detail = ", ".join(f"{name} {size / GiB:.2f} GiB" for name, size in parts.items())
        raise PolarJaxError(f"{task} needs {needed / GiB:.2f} GiB ({detail}) but "
                            f"{device.platform} has {available / GiB:.2f} GiB free; lower {lower}")
