"""The windowing protocol that evaluation and router data collection share: a token stream cut
into non-overlapping windows of `seq_len` tokens; a shorter last window is kept (right-padded)
if it has at least 2 tokens. A leaf module: it imports only numpy."""

from __future__ import annotations

import numpy as np


def make_windows(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens, mask `[num_windows, seq_len]`; the last window is right-padded (mask 0)."""
    starts = [s for s in range(0, len(ids), seq_len) if len(ids) - s >= 2]
    tokens = np.zeros((len(starts), seq_len), np.int32)
    mask = np.zeros((len(starts), seq_len), np.int32)
    for row, start in enumerate(starts):
        chunk = ids[start:start + seq_len]
        tokens[row, :len(chunk)] = chunk
        mask[row, :len(chunk)] = 1
    return tokens, mask


def stream_windows(streams: np.ndarray | list[np.ndarray], seq_len: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`make_windows` of one token stream, or of several one after the other (no window spans
    two streams)."""
    windows = [make_windows(s, seq_len) for s in ([streams] if isinstance(streams, np.ndarray) else streams)]
    return np.concatenate([w[0] for w in windows]), np.concatenate([w[1] for w in windows])
