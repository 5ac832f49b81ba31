"""Prompts as users pass them -> one left-padded batch; generated tokens back in the same form.

    int [b, l]                 -> the batch as is ("batch")      -> int32 [b, n]
    int [l] / a list of ints   -> a batch of one ("single")       -> int32 [n]
    a list of 1-D prompts      -> left-padded to the longest,     -> a list of int32 [n_r], each
      (lengths may differ)        with the attention mask ("list")   cut at its row's end

Left padding with the mask gives each row exactly the tokens it would get alone (docs/generation.md,
"Prompts and return types").
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import numpy as np

FORMS = ("batch", "single", "list")


class PromptBatch(NamedTuple):
    """tokens int [b, l] (numpy, or a jax array passed by the caller; cast to int32 only after
    the range check); mask int32 [b, l] or None (1 = real token, 0 = padding); form: one of
    FORMS."""

    tokens: object
    mask: object
    form: str


def _int_row(p, where: str) -> np.ndarray:
    a = np.asarray(p)
    if a.dtype.kind in "fO" and isinstance(p, (list, tuple)) and all(_is_int(t) for t in p):
        # Python ints beyond int64 (numpy made them float64 or object): never cast them.
        bad = next((int(t) for t in p if not -2**63 <= int(t) < 2**63), None)
        if bad is not None:
            raise ValueError(f"token ids must be in [0, vocab) for this model; {where} holds "
                             f"{bad}")
    if a.ndim != 1:
        raise ValueError(f"{where} must be a 1-D sequence of token ids, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{where} is empty (length 0)")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{where} must hold integer token ids, got dtype {a.dtype}")
    return a


def _is_int(x) -> bool:
    if isinstance(x, bool):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def as_batch(prompts, attention_mask=None, pad_to_multiple_of: int | None = None) -> PromptBatch:
    """Normalizes `prompts` (see the module docstring) into a left-padded batch.

    Args:
      prompts: int [b, l] (numpy / jax), int [l], a list of ints, or a list of 1-D prompts.
      attention_mask: [b, l] (or [l] for one prompt) for an already padded batch; not with a
        list of prompts (they are padded here).
      pad_to_multiple_of: left-pad the width to a multiple of this (prompts of nearby lengths
        then share one compiled prefill).

    Raises:
      ValueError: an empty prompt, non-integer ids, a ragged nesting, or a mask with a list.
    """
    if pad_to_multiple_of is not None and (not _is_int(pad_to_multiple_of)
                                           or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts is an empty list")
        if all(_is_int(t) for t in prompts):
            form, rows = "single", [_int_row(list(prompts), "the prompt")]
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask is for an already padded int [b, l] batch; a "
                                 "list of prompts is padded (and masked) here: drop the mask")
            form = "list"
            rows = [_int_row(p, f"prompt {i}") for i, p in enumerate(prompts)]
        tokens, mask = _left_pad(rows)
    else:
        if not isinstance(prompts, (np.ndarray, jax.Array)):
            raise ValueError(f"prompts must be int [b, l], int [l] or a list of prompts, got "
                             f"{type(prompts).__name__}")
        ndim = prompts.ndim
        if ndim not in (1, 2):
            raise ValueError(f"prompts must be int [batch, length] or int [length], got shape "
                             f"{prompts.shape}")
        form = "batch" if ndim == 2 else "single"
        tokens = prompts if ndim == 2 else np.asarray(prompts)[None]  # host: no per-length op
        mask = attention_mask
        if mask is not None and ndim == 1:
            mask = np.asarray(mask)[None] if np.ndim(mask) == 1 else mask
    if pad_to_multiple_of is not None:
        tokens, mask = _pad_width(tokens, mask, int(pad_to_multiple_of))
    return PromptBatch(tokens, mask, form)


def _left_pad(rows: list[np.ndarray]):
    """Rows of lengths l_r -> (tokens int [b, max l_r], mask or None when all equal)."""
    width = max(len(r) for r in rows)
    # The rows' own integer dtype: the range check runs before any cast to int32 (`_check_tokens`).
    dtype = np.result_type(np.int32, *[r.dtype for r in rows])
    tokens = np.zeros((len(rows), width), dtype)  # any id under the mask: it is ignored
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return tokens, (None if mask.all() else mask)


def _pad_width(tokens, mask, multiple: int):
    batch, length = tokens.shape
    extra = -length % multiple
    if extra == 0:
        return tokens, mask
    tokens = np.asarray(tokens)  # its own dtype: checked before the cast to int32
    tokens = np.concatenate([np.zeros((batch, extra), tokens.dtype), tokens], axis=1)
    body = np.ones((batch, length), np.int32) if mask is None else np.asarray(mask, np.int32)
    return tokens, np.concatenate([np.zeros((batch, extra), np.int32), body], axis=1)


def prompt_seen(tokens, mask, vocab: int) -> np.ndarray:
    """bool [b, vocab]: the ids present in each prompt row (masked positions excluded), on the
    host (no compile per prompt length)."""
    tokens = np.asarray(tokens)
    seen = np.zeros((tokens.shape[0], vocab), bool)
    rows = np.broadcast_to(np.arange(tokens.shape[0])[:, None], tokens.shape)
    real = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    seen[rows[real], tokens[real]] = True
    return seen


def rows_of(tokens, lengths) -> list[np.ndarray]:
    """int32 [b, n] and lengths [b] -> each row cut at its length (numpy)."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return [tokens[r, : int(lengths[r])].copy() for r in range(tokens.shape[0])]


def in_form(tokens, lengths, form: str):
    """The generated tokens [b, n] in the form the prompts came in (see the module docstring)."""
    if form == "single":
        return tokens[0]
    if form == "list":
        return rows_of(tokens, lengths)
    return tokens
