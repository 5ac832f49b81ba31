"""Sampling strategies for `generate`: small frozen dataclasses (static under jit).

Each strategy maps next-token logits [b, V] (fp32, V = the padded vocabulary) and a PRNG key to
token ids [b] int32. Ids ≥ `vocab_size` (vocabulary padding) get −inf first, so they are never
picked. The filters follow transformers' order and semantics (temperature → top-k → top-p):

- `Greedy`: argmax (the first maximum on ties, as torch).
- `Sampling(temperature, top_k, top_p)`: logits / temperature; top-k keeps the logits ≥ the k-th
  largest (ties with it included); top-p keeps the smallest set of most probable tokens whose
  probability reaches p: in descending order a token is kept while the mass *before* it is < p,
  so the most probable token always survives. The sample is drawn from the renormalised rest.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

f32 = jnp.float32


def mask_padded_vocab(logits, vocab_size: int):
    """Sets logits of ids ≥ vocab_size (vocabulary padding) to −inf. logits: [..., V]."""
    if vocab_size >= logits.shape[-1]:
        return logits
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids < vocab_size, logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Argmax decoding."""

    def process(self, logits):
        """Identity (greedy has no distribution to filter). logits: [b, V] -> [b, V]."""
        return logits

    def sample(self, logits, key):
        """logits [b, V] fp32 -> ids [b] int32 (the key is unused)."""
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Ancestral sampling with temperature, optional top-k and top-p (nucleus) filtering.

    Attributes:
      temperature: > 0; logits are divided by it.
      top_k: keep the k most probable ids (None: all).
      top_p: in (0, 1]; keep the smallest most-probable set with mass ≥ top_p (None: all).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    def process(self, logits):
        """The filtered, temperature-scaled logits [b, V]: −inf where an id cannot be drawn;
        `softmax` of the result is the distribution `sample` draws from."""
        logits = logits.astype(f32) / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]  # [b, 1]
            logits = jnp.where(logits >= kth, logits, -jnp.inf)
        if self.top_p is not None and self.top_p < 1.0:
            desc = -jnp.sort(-logits, axis=-1)  # [b, V] descending
            probs = jax.nn.softmax(desc, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative sum
            n_keep = jnp.sum(mass_before < self.top_p, axis=-1, keepdims=True)  # ≥ 1
            cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)  # smallest kept logit
            logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
        return logits

    def sample(self, logits, key):
        """logits [b, V] fp32, key -> ids [b] int32 drawn from softmax(process(logits))."""
        return jax.random.categorical(key, self.process(logits), axis=-1).astype(jnp.int32)


Sampler = Greedy | Sampling


def make_sampler(temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None) -> Sampler:
    """`Greedy()` at temperature 0, else `Sampling(...)`.

    Raises:
      ValueError: a negative temperature, or top_k / top_p with temperature 0 (greedy ignores
        them; asking for both is almost certainly a mistake).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if temperature == 0:
        if top_k is not None or top_p is not None:
            raise ValueError(
                f"top_k={top_k!r} / top_p={top_p!r} need temperature > 0 (temperature 0 is greedy)"
            )
        return Greedy()
    return Sampling(float(temperature), top_k, top_p)


def sample_logits(logits, key, sampler: Sampler, vocab_size: int):
    """Next-token ids [b] int32 from logits [b, V]: padded ids masked, then `sampler`."""
    return sampler.sample(mask_padded_vocab(logits.astype(f32), vocab_size), key)
