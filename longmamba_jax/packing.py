"""Packed documents: several documents in one row, none seeing another (docs/design.md,
"Packed documents").

The model takes `segment_ids` int [b, l]: a run of equal ids is one document, and where the id
changes a new document starts with a zero SSM state and an empty conv window, exactly as if it
ran alone. `cu_seqlens` (mamba_ssm's and flash-attention's varlen convention: the cumulative
document lengths [0, l_1, l_1 + l_2, ..., l] of a single row) is accepted as a convenience.
"""

from __future__ import annotations

import jax
import numpy as np


def resolve_segment_ids(shape: tuple[int, int], segment_ids=None, cu_seqlens=None):
    """The segment ids of a batch of `shape` [b, l] from either form, or None for none.

    Raises:
      ValueError: both forms given, or one that does not fit the tokens.
    """
    b, length = shape
    if segment_ids is not None and cu_seqlens is not None:
        raise ValueError("give segment_ids or cu_seqlens, not both")
    if cu_seqlens is not None:
        cu = np.asarray(cu_seqlens)
        if b != 1:
            raise ValueError(f"cu_seqlens describes one packed row; tokens have batch {b} (use "
                             "segment_ids [b, l] for several rows)")
        if (cu.ndim != 1 or cu.size < 2 or not np.issubdtype(cu.dtype, np.integer)
                or cu[0] != 0 or cu[-1] != length or np.any(np.diff(cu) <= 0)):
            raise ValueError(f"cu_seqlens must be increasing ints from 0 to the length {length}, "
                             f"got {cu.tolist()}")
        ids = np.repeat(np.arange(cu.size - 1, dtype=np.int32), np.diff(cu))
        return ids[None]
    if segment_ids is None:
        return None
    seg = segment_ids if isinstance(segment_ids, jax.core.Tracer) else np.asarray(segment_ids)
    if seg.shape != (b, length) or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"segment_ids must be int [{b}, {length}] like tokens, got "
                         f"{seg.dtype} {seg.shape}")
    return seg


def document_lengths(segment_ids) -> list[list[int]]:
    """Per row, the lengths of its documents in order (needs concrete ids, not traced ones)."""
    if isinstance(segment_ids, jax.core.Tracer):
        raise ValueError("per-document methods (LongMamba thresholds per document length) need "
                         "concrete segment_ids, not traced ones")
    seg = np.asarray(segment_ids)
    out = []
    for row in seg:
        starts = np.flatnonzero(np.concatenate([[True], row[1:] != row[:-1]]))
        out.append(np.diff(np.append(starts, row.size)).tolist())
    return out
