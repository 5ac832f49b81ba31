"""Prompt building blocks shared by the evaluations and the bundled demo.

Prompts are assembled at the token level from separately encoded pieces (instruction, filler
words, needles, question), so a prompt hits its target length exactly, and filler text is cut
only at word boundaries, which is where needles go.

The passkey format (DeciMamba / landmark-attention style; the bundled demo model was trained on
it):

    INSTRUCTION + filler[:a] + " The pass key is NNNNN. Remember it. NNNNN is the pass key."
                + filler[a:] + " What is the pass key? The pass key is"

with n = target - len(instruction) - len(needle) - len(question) filler tokens and the needle at
the word boundary nearest a = depth * n (depth 0: right after the instruction; depth 1: right
before the question). The answer is the first run of digits of the greedy continuation, cut to
5 digits (`parse_answer`).

    from longmamba_jax.prompts import Filler, make_passkey_prompt
    p = make_passkey_prompt(tokenizer, Filler.from_text(tokenizer, text), 8192, 0.5, "12345")
    p.tokens, p.needle_pos
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "INSTRUCTION", "NEEDLE", "QUESTION", "Filler", "PasskeyPrompt", "assemble",
    "make_passkey_prompt", "nearest_boundary", "parse_answer",
]

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about the important information there.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"

class Filler:
    """A token stream made of text units (words, or noise sentences), each encoded as " unit".

    Units are encoded one by one (cached per distinct unit), which for byte tokenizers and
    GPT-style BPE equals encoding the text itself, and gives the unit boundaries where cuts and
    needles may go. `window(n, start_unit)` cycles through the units when `n` exceeds the text.
    """

    def __init__(self, tokenizer, units: Sequence[str]):
        """Encodes `units`.

        Args:
            tokenizer: has `encode(str) -> list[int]`.
            units: non-empty strings (e.g. `text.split()`).
        """
        if not units:
            raise ValueError("Filler needs at least one text unit")
        cache: dict[str, list[int]] = {}
        pieces = []
        for u in units:
            ids = cache.get(u)
            if ids is None:
                ids = cache[u] = tokenizer.encode(" " + u)
            pieces.append(ids)
        lens = np.array([len(p) for p in pieces], dtype=np.int64)
        if lens.min() < 1:
            raise ValueError("a filler unit encodes to no tokens")
        self.tokens = np.fromiter((t for p in pieces for t in p), dtype=np.int64,
                                  count=int(lens.sum()))
        self.starts = np.concatenate([[0], np.cumsum(lens)[:-1]])  # [units] token offsets
        self.n_units = len(units)

    @classmethod
    def from_text(cls, tokenizer, text: str) -> Filler:
        """Word units of `text` (split on whitespace)."""
        return cls(tokenizer, text.split())

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, n: int, start_unit: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Returns `n` filler tokens from unit `start_unit` on, and the unit starts inside them.

        Returns:
            (tokens int [n], boundaries int [k]): boundaries are the offsets (0 <= b <= n) where
            a unit starts, always including 0 and n (a cut happens only at n).
        """
        if n < 0:
            raise ValueError(f"filler length must be >= 0, got {n}")
        total = len(self.tokens)
        begin = int(self.starts[start_unit % self.n_units])
        idx = (begin + np.arange(n)) % total
        tokens = self.tokens[idx]
        reps = (begin + n) // total + 1
        starts = (self.starts[None, :] + total * np.arange(reps + 1)[:, None]).ravel() - begin
        bounds = starts[(starts >= 0) & (starts <= n)]
        bounds = np.unique(np.concatenate([[0], bounds, [n]]))
        return tokens, bounds


def nearest_boundary(bounds: np.ndarray, position: float) -> int:
    """The boundary in `bounds` closest to `position` (ties go to the earlier one)."""
    i = int(np.argmin(np.abs(bounds.astype(np.float64) - position)))
    return int(bounds[i])


def assemble(prefix: Sequence[int], filler: np.ndarray,
             inserts: Sequence[tuple[int, Sequence[int]]],
             suffix: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """prefix + filler with `inserts` placed at filler offsets + suffix.

    Args:
        prefix: token ids before the filler.
        filler: filler tokens [n].
        inserts: (offset into filler, token ids) pairs; offsets in 0..n, any order.
        suffix: token ids after the filler.

    Returns:
        (tokens int [len], positions): positions[i] is where inserts[i] starts in the result.
    """
    order = sorted(range(len(inserts)), key=lambda i: inserts[i][0])
    parts: list[np.ndarray] = [np.asarray(prefix, dtype=np.int64)]
    positions = [0] * len(inserts)
    cursor, length = 0, len(prefix)
    for i in order:
        offset, ids = inserts[i]
        if not 0 <= offset <= len(filler):
            raise ValueError(f"insert offset {offset} outside the filler (length {len(filler)})")
        parts.append(filler[cursor:offset])
        length += offset - cursor
        positions[i] = length
        parts.append(np.asarray(ids, dtype=np.int64))
        length += len(ids)
        cursor = offset
    parts.append(filler[cursor:])
    parts.append(np.asarray(suffix, dtype=np.int64))
    return np.concatenate(parts), positions


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey prompt.

    Attributes:
        tokens: the prompt, int [length].
        key: the 5-digit key (a string).
        depth: requested depth in [0, 1].
        needle_pos: token index where the needle starts.
        needle_len: needle length in tokens.
        filler_len: filler tokens in the prompt (both sides of the needle).
        filler_before: filler tokens before the needle.
        question_len: question length in tokens (DeciMamba keeps these).
    """

    tokens: np.ndarray
    key: str
    depth: float
    needle_pos: int
    needle_len: int
    filler_len: int
    filler_before: int
    question_len: int

    @property
    def actual_depth(self) -> float:
        """Where the needle really is: filler before it / all filler."""
        return self.filler_before / self.filler_len if self.filler_len else 0.0


def make_passkey_prompt(tokenizer, filler: Filler, length: int, depth: float, key: str | int,
                start_unit: int = 0) -> PasskeyPrompt:
    """Builds one passkey prompt of exactly `length` tokens.

    Args:
        tokenizer: has `encode`.
        filler: the filler text stream.
        length: target prompt length in tokens.
        depth: where the needle goes, as a fraction of the filler (0..1).
        key: the key (5 digits).
        start_unit: first filler word (varies the filler between samples).

    Raises:
        ValueError: on a depth outside [0, 1], a malformed key, or a length too short to hold
            the instruction, needle and question.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(key)
    if not re.fullmatch(r"\d{5}", key):
        raise ValueError(f"passkey must be 5 digits, got {key!r}")
    prefix = tokenizer.encode(INSTRUCTION)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION)
    n = length - len(prefix) - len(needle) - len(question)
    if n < 0:
        raise ValueError(f"passkey length {length} is too short: instruction, needle and question "
                         f"alone take {length - n} tokens")
    tokens, bounds = filler.window(n, start_unit)
    at = nearest_boundary(bounds, depth * n)
    prompt, (pos,) = assemble(prefix, tokens, [(at, needle)], question)
    return PasskeyPrompt(prompt, key, float(depth), pos, len(needle), n, at, len(question))


def parse_answer(text: str) -> str:
    """The first run of digits in `text`, cut to 5 digits ("" when there is none)."""
    m = re.search(r"\d+", text)
    return m.group(0)[:5] if m else ""
