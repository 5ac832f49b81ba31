"""Next-token cross entropy for causal LM training (docs/training.md, "Loss").

Position t predicts token t + 1. A prediction counts when its target is scored
(`loss_mask[t + 1]`, 0 on padding) and, for packed rows, when both tokens belong to the same
document (`segment_ids[t] == segment_ids[t + 1]`): no loss across a document boundary.

    ce [b, l − 1] = logsumexp(logits[:, :-1]) − logits[:, :-1][tokens[:, 1:]]
    loss          = Σ ce · counts / Σ counts
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["causal_lm_loss", "check_batch", "next_token_ce", "prediction_weights"]

f32 = jnp.float32

# the per-position entries a batch may hold next to "tokens", each [b, l] like it
BATCH_KEYS = ("loss_mask", "attention_mask", "segment_ids")


def check_batch(batch) -> tuple[int, int]:
    """(b, l) of a training batch; raises ValueError naming the entry that is wrong.

    A batch is a dict with "tokens": int [b, l], l >= 2, and optional "loss_mask",
    "attention_mask", "segment_ids", each [b, l]. Works on arrays and on traced values (the
    shapes are static), so a jitted step fails at trace time with this message."""
    if not isinstance(batch, dict) or "tokens" not in batch:
        raise ValueError(f"a batch must be a dict with 'tokens' (int [batch, length]), got "
                         f"{type(batch).__name__}"
                         + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""))
    tokens = batch["tokens"]
    shape = tuple(getattr(tokens, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"batch['tokens'] must be [batch, length], got shape {shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"batch['tokens'] must hold integer token ids, got {tokens.dtype}")
    if shape[1] < 2:
        raise ValueError(f"batch['tokens'] needs length >= 2 (a next token to predict), got "
                         f"shape {shape}")
    for key in BATCH_KEYS:
        value = batch.get(key)
        if value is not None and tuple(jnp.shape(value)) != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(jnp.shape(value))}, but "
                             f"batch['tokens'] has shape {shape}")
    return shape


def next_token_ce(logits, tokens):
    """Cross entropy of every next-token prediction.

    Args:
      logits: [b, l, V] (any float dtype; computed in fp32). tokens: int [b, l].

    Returns:
      (ce fp32 [b, l − 1], hit bool [b, l − 1]: whether the argmax is the target).
    """
    logits = logits[:, :-1].astype(f32)
    targets = tokens[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = jax.nn.logsumexp(logits, axis=-1) - picked
    return ce, jnp.argmax(logits, axis=-1) == targets


def prediction_weights(tokens, loss_mask=None, segment_ids=None):
    """fp32 [b, l − 1]: the weight of each prediction t -> t + 1 (`loss_mask` of the target,
    0 where a document boundary falls between t and t + 1)."""
    weights = jnp.ones(tokens[:, 1:].shape, f32)
    if loss_mask is not None:
        weights = weights * jnp.asarray(loss_mask)[:, 1:].astype(f32)
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        weights = weights * (seg[:, 1:] == seg[:, :-1]).astype(f32)
    return weights


def causal_lm_loss(logits, batch, *, whole=None, rng=None):
    """Mean next-token cross entropy over the predictions that count (module docstring).

    Args:
      logits: [b, l, V] (padded vocabulary entries at a large negative value, as the train step
        passes them).
      batch: {"tokens": int [b, l], optional "loss_mask": [b, l] (1 = this token is a target,
        0 = padding or not scored), optional "segment_ids": int [b, l] (packed documents)}.
      whole: the step's whole batch when `batch` is one of its micro-batches: the mean is over
        the whole batch's predictions, so micro-batch losses add up to the step's.
      rng: unused (the train step's per-step key; losses that sample may use it).

    Returns:
      (loss fp32 scalar, {"loss", "tokens": number of predictions counted, "accuracy"}).
    """
    del rng
    b, l = check_batch(batch)
    if logits.ndim != 3 or logits.shape[:2] != (b, l):
        raise ValueError(f"logits must be [batch, length, vocab] = [{b}, {l}, V], got shape "
                         f"{logits.shape}")
    tokens = batch["tokens"]
    ce, hit = next_token_ce(logits, tokens)
    weights = prediction_weights(tokens, batch.get("loss_mask"), batch.get("segment_ids"))
    if whole is None:
        count = jnp.sum(weights)
    else:
        count = jnp.sum(prediction_weights(whole["tokens"], whole.get("loss_mask"),
                                           whole.get("segment_ids")))
    count = jnp.maximum(count, 1.0)
    loss = jnp.sum(ce * weights) / count
    accuracy = jnp.sum(hit * weights) / count
    return loss, {"loss": loss, "tokens": jnp.sum(weights), "accuracy": accuracy}
