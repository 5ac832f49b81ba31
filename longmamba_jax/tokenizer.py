"""Tokenizers: a built-in byte-level tokenizer and a thin wrapper over local HF tokenizers.

Both expose the same small interface, which is all the demo, the calibration CLI and the
evaluations use:

    encode(text) -> list[int]      # no special tokens added
    decode(ids)  -> str            # invalid UTF-8 is replaced, never raises
    vocab_size, eos_token_id

`ByteTokenizer` maps text to its UTF-8 bytes: ids 0..255 are the bytes themselves and id 256
(`ByteTokenizer.EOS_ID`) is an end-of-sequence marker, so `vocab_size` is 257. It needs no files,
which makes it the tokenizer of the small models this project trains itself.

`load_tokenizer("bytes")` returns a `ByteTokenizer`; any other name is a local tokenizer directory
(or a hub id already in the local Hugging Face cache), loaded with
`transformers.AutoTokenizer(..., local_files_only=True)`: nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]


class ByteTokenizer:
    """Byte-level tokenizer: one token per UTF-8 byte, plus an EOS id.

    Ids 0..255 are bytes; `EOS_ID` (256) marks the end of a sequence. `decode` skips every id
    that is not a byte (the EOS id, and ids a model with a padded vocabulary may produce), and
    replaces invalid UTF-8 with U+FFFD.
    """

    EOS_ID = 256
    name = "bytes"

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes + EOS."""
        return 257

    @property
    def eos_token_id(self) -> int:
        """The end-of-sequence id (256)."""
        return self.EOS_ID

    def encode(self, text: str) -> list[int]:
        """Encodes `text` to its UTF-8 bytes (no EOS is appended).

        Args:
            text: any string.

        Returns:
            One id in 0..255 per UTF-8 byte.
        """
        if not isinstance(text, str):
            raise ValueError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids to text, skipping non-byte ids and replacing invalid UTF-8.

        Args:
            ids: token ids (ints or a 1-D integer array).

        Returns:
            The decoded string.
        """
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """The same interface over a `transformers` tokenizer (`encode` adds no special tokens)."""

    def __init__(self, tokenizer, name: str):
        """Wraps an already loaded `transformers` tokenizer.

        Args:
            tokenizer: a `PreTrainedTokenizer(Fast)`.
            name: where it came from (shown in reports).
        """
        self._tok = tokenizer
        self.name = name

    @property
    def hf_tokenizer(self):
        """The wrapped `transformers` tokenizer."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self._tok)

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's EOS id, or None when it has none."""
        return self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Encodes `text` without adding special tokens (no BOS/EOS)."""
        if not isinstance(text, str):
            raise ValueError(f"HFTokenizer.encode expects a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids, skipping special tokens and ids outside the tokenizer's vocabulary."""
        n = len(self._tok)
        ids = [int(i) for i in ids if 0 <= int(i) < n]
        return self._tok.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


def load_tokenizer(name_or_dir: str) -> ByteTokenizer | HFTokenizer:
    """Returns the tokenizer named by `name_or_dir`, without touching the network.

    Args:
        name_or_dir: "bytes" for the built-in `ByteTokenizer`; otherwise a local directory with
            tokenizer files, or a hub id (e.g. "EleutherAI/gpt-neox-20b") already in the local
            Hugging Face cache.

    Returns:
        A tokenizer with `encode`, `decode`, `vocab_size` and `eos_token_id`.

    Raises:
        ValueError: if `name_or_dir` is empty, or no tokenizer can be loaded from it offline.
    """
    if not isinstance(name_or_dir, str) or not name_or_dir:
        raise ValueError(f"tokenizer name must be 'bytes' or a directory, got {name_or_dir!r}")
    if name_or_dir == "bytes":
        return ByteTokenizer()
    is_dir = os.path.isdir(name_or_dir)
    if not is_dir and os.path.exists(name_or_dir):
        raise ValueError(f"tokenizer path {name_or_dir!r} is a file; pass its directory")
    from transformers import AutoTokenizer  # heavy import, only when needed

    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        where = "directory" if is_dir else "hub id (not in the local cache; nothing is downloaded)"
        raise ValueError(
            f"could not load a tokenizer from {name_or_dir!r} ({where}): {e}. "
            "Pass 'bytes' for the built-in byte tokenizer or a local tokenizer directory."
        ) from e
    return HFTokenizer(tok, name_or_dir)
