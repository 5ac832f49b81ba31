"""Batches of token rows for training, cut from a token stream or a list of documents.

- A stream (1-D ints): consecutive rows of `seq_len` tokens; a shorter tail is dropped.
- Documents, packed (default): the documents laid end to end and cut into rows of `seq_len`;
  `segment_ids` number the documents of each row from 1 (a document cut at a row's end
  continues in the next row as a new segment), the last row is right-padded (id 0, no loss).
- Documents, not packed: each document alone, in rows of `seq_len` (a longer one split),
  right-padded.

`batch(step)` is a pure function of (seed, step): rows are visited in a fresh permutation each
epoch, so a resumed run sees the batches the uninterrupted one saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["TokenBatches"]


class TokenBatches:
    """Training batches {"tokens": int32 [b, l], "loss_mask": fp32 [b, l] (0 on padding),
    and for packed documents "segment_ids": int32 [b, l]}.

    Args:
      data: a token stream (1-D ints) or a list of documents (each a 1-D int sequence).
      batch_size: rows per batch (b). seq_len: tokens per row (l).
      pack: with documents, several per row (`segment_ids`); else one per row.
      shuffle: visit the rows in a random order per epoch (else in order).
      seed: seeds that order.
      pad_id: token id of right padding.
    """

    def __init__(self, data, *, batch_size: int, seq_len: int, pack: bool = True,
                 shuffle: bool = True, seed: int = 0, pad_id: int = 0):
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, "
                             f"{seq_len}")
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.shuffle, self.seed = shuffle, int(seed)
        documents = _as_documents(data)
        if documents is None:
            stream = np.asarray(data)
            rows = len(stream) // seq_len
            if rows == 0:
                raise ValueError(f"the token stream has {len(stream)} tokens, fewer than "
                                 f"seq_len {seq_len}")
            self.tokens = stream[:rows * seq_len].reshape(rows, seq_len).astype(np.int32)
            self.loss_mask = np.ones(self.tokens.shape, np.float32)
            self.segment_ids = None
        elif pack:
            self.tokens, self.loss_mask, self.segment_ids = _pack(documents, seq_len, pad_id)
        else:
            self.tokens, self.loss_mask = _one_per_row(documents, seq_len, pad_id)
            self.segment_ids = None

    @property
    def rows(self) -> int:
        """Rows per epoch."""
        return len(self.tokens)

    def batch(self, step: int) -> dict:
        """The batch of training step `step` (numpy arrays)."""
        first = int(step) * self.batch_size
        index = np.empty(self.batch_size, np.int64)
        for i, r in enumerate(range(first, first + self.batch_size)):
            epoch, at = divmod(r, self.rows)
            index[i] = self._order(epoch)[at]
        out = {"tokens": self.tokens[index], "loss_mask": self.loss_mask[index]}
        if self.segment_ids is not None:
            out["segment_ids"] = self.segment_ids[index]
        return out

    def __iter__(self):
        step = 0
        while True:
            yield self.batch(step)
            step += 1

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.rows)
        if getattr(self, "_cached", (None,))[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch])
                            .permutation(self.rows))
        return self._cached[1]


def _as_documents(data) -> list[np.ndarray] | None:
    """The documents of `data`, or None when it is one stream."""
    if isinstance(data, np.ndarray) or not isinstance(data, Sequence) or not data:
        return None
    if np.ndim(data[0]) == 0:  # a list of ints: a stream
        return None
    docs = [np.asarray(d) for d in data]
    for i, d in enumerate(docs):
        if d.ndim != 1 or not np.issubdtype(d.dtype, np.integer):
            raise ValueError(f"document {i} must be a 1-D sequence of token ids, got "
                             f"{d.dtype} {d.shape}")
    docs = [d for d in docs if d.size]
    if not docs:
        raise ValueError("all documents are empty")
    return docs


def _pack(documents, seq_len: int, pad_id: int):
    stream = np.concatenate(documents).astype(np.int32)
    doc = np.repeat(np.arange(len(documents)), [len(d) for d in documents])
    rows = -(-len(stream) // seq_len)
    pad = rows * seq_len - len(stream)
    tokens = np.concatenate([stream, np.full(pad, pad_id, np.int32)]).reshape(rows, seq_len)
    loss_mask = np.concatenate([np.ones(len(stream), np.float32), np.zeros(pad, np.float32)])
    doc = np.concatenate([doc, np.full(pad, -1)]).reshape(rows, seq_len)
    # number each row's documents from 1 in order; padding (doc -1) gets 0
    starts = np.concatenate([np.ones((rows, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    segment_ids = np.where(doc >= 0, np.cumsum(starts, axis=1), 0).astype(np.int32)
    return tokens, loss_mask.reshape(rows, seq_len), segment_ids


def _one_per_row(documents, seq_len: int, pad_id: int):
    pieces = [d[i:i + seq_len] for d in documents for i in range(0, len(d), seq_len)]
    tokens = np.full((len(pieces), seq_len), pad_id, np.int32)
    loss_mask = np.zeros((len(pieces), seq_len), np.float32)
    for r, piece in enumerate(pieces):
        tokens[r, :len(piece)] = piece
        loss_mask[r, :len(piece)] = 1
    return tokens, loss_mask
