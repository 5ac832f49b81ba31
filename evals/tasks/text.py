"""Text for the prompts: the bundled filler, and prompts assembled from encoded pieces.

Prompts are assembled at the token level from separately encoded pieces (instruction, filler
words, needles, question), so a prompt hits its target length exactly; filler text is cut only
at word boundaries, which is where needles go.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np

# Prompt pieces live in the library (the bundled demo builds the same prompts); re-exported.
from longmamba_jax.prompts import Filler, assemble, nearest_boundary

__all__ = ["DATA_DIR", "DEFAULT_TEXT", "Filler", "PieceEncoder", "assemble", "fit_count",
           "load_text", "nearest_boundary"]

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_TEXT = os.path.join(DATA_DIR, "lambada_excerpt.txt")


def load_text(path: str | None = None) -> str:
    """Reads a UTF-8 text file (default: the bundled LAMBADA excerpt)."""
    path = path or DEFAULT_TEXT
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"text file {path!r} is empty")
    return text


def fit_count(build: Callable[[int], int], target: int, lo: int = 0, hi: int = 64) -> int:
    """Largest count c >= lo with build(c) <= target, for a non-decreasing `build` (token length).

    Raises:
        ValueError: if even `build(lo)` exceeds `target`.
    """
    if build(lo) > target:
        raise ValueError(f"target length {target} is too short for this prompt "
                         f"(the smallest prompt has {build(lo)} tokens)")
    while build(hi) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if build(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


class PieceEncoder:
    """Encodes text pieces one by one, with a cache; a prompt is the concatenation of pieces.

    Encoding pieces separately keeps every piece's token span known and makes a prompt's length
    the sum of its pieces' lengths, which is what length fitting needs.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}

    def __call__(self, piece: str) -> tuple[int, ...]:
        ids = self._cache.get(piece)
        if ids is None:
            ids = self._cache[piece] = tuple(self.tokenizer.encode(piece))
        return ids

    def length(self, pieces: Iterable[str]) -> int:
        """Total tokens of `pieces`."""
        return sum(len(self(p)) for p in pieces)

    def join(self, pieces: Iterable[str]) -> np.ndarray:
        """The concatenated tokens of `pieces`, int [total]."""
        return np.fromiter((t for p in pieces for t in self(p)), dtype=np.int64)
