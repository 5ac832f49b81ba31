"""Sampling strategies and logits processors for `generate` (docs/generation.md, "Options").

Each strategy maps next-token logits [b, V] (fp32, V = the padded vocabulary) and a PRNG key to
token ids [b] int32. Ids ≥ `vocab_size` (vocabulary padding) get −inf first, so they are never
picked. The processors follow transformers' order and semantics:

    repetition penalty → temperature → top-k → top-p → min-p → draw

- repetition penalty p (greedy too): for every id already seen (prompt or generated), a logit
  x > 0 becomes x / p, x < 0 becomes x · p (`RepetitionPenaltyLogitsProcessor`).
- `Greedy`: argmax (the first maximum on ties, as torch).
- `Sampling(temperature, top_k, top_p, min_p)`: logits / temperature; top-k keeps the logits ≥
  the k-th largest (ties with it included); top-p keeps the smallest set of most probable tokens
  whose probability reaches p: in descending order a token is kept while the mass *before* it is
  < p, so the most probable token always survives; min-p keeps the tokens whose probability is
  ≥ min_p · (the largest probability). The sample is drawn from the renormalised rest.

`Greedy` and `Sampling` are pytrees: the float knobs (temperature, top_p, min_p) are leaves, so
changing their values does not recompile the decode loop; a knob that is off (None) has no leaf
and costs nothing in the compiled step; `top_k` is static (it sizes `lax.top_k`).
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


def repetition_penalty(logits, seen, penalty):
    """transformers' repetition penalty: logits [b, V], seen bool [b, V] (ids in the prompt or
    generated so far), penalty > 0 -> logits with x/p where x > 0 and x·p where x < 0 for the
    seen ids."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def seen_ids(tokens, mask, vocab: int):
    """bool [b, vocab]: which ids occur in each row of tokens [b, l] (where mask [b, l] is 1)."""
    batch = tokens.shape[0]
    hit = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], tokens.shape)
    return jnp.zeros((batch, vocab), bool).at[rows, tokens].max(hit)


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Argmax decoding."""

    def process(self, logits):
        """Identity (greedy has no distribution to filter). logits: [b, V] -> [b, V]."""
        return logits

    def draw(self, logits, key):
        """logits [b, V] fp32 (already processed) -> ids [b] int32 (the key is unused)."""
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(self, logits, key):
        """logits [b, V] fp32 -> ids [b] int32."""
        return self.draw(self.process(logits), key)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Ancestral sampling with temperature, optional top-k, top-p (nucleus) and min-p filters.

    Attributes:
      temperature: > 0; logits are divided by it.
      top_k: keep the k most probable ids (None: all).
      top_p: in (0, 1]; keep the smallest most-probable set with mass ≥ top_p (None: all).
      min_p: in [0, 1]; keep the ids with probability ≥ min_p · max probability (None: all).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {t!r}")
        object.__setattr__(self, "temperature", float(t))
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {k!r}")
        for name, low_open in (("top_p", True), ("min_p", False)):
            v = getattr(self, name)
            if v is None:
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and \
                (0.0 < v <= 1.0 if low_open else 0.0 <= v <= 1.0)
            if not ok:
                interval = "(0, 1]" if low_open else "[0, 1]"
                raise ValueError(f"{name} must be in {interval} or None, got {v!r}")
            object.__setattr__(self, name, float(v))
        # top_p = 1 and min_p = 0 keep every id: off, so that they cost nothing.
        if self.top_p == 1.0:
            object.__setattr__(self, "top_p", None)
        if self.min_p == 0.0:
            object.__setattr__(self, "min_p", None)

    def process(self, logits):
        """The filtered, temperature-scaled logits [b, V]: −inf where an id cannot be drawn;
        `softmax` of the result is the distribution `draw` samples from."""
        logits = logits.astype(f32) / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]  # [b, 1]
            logits = jnp.where(logits >= kth, logits, -jnp.inf)
        if self.top_p is not None:
            desc = -jnp.sort(-logits, axis=-1)  # [b, V] descending
            probs = jax.nn.softmax(desc, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative sum
            n_keep = jnp.sum(mass_before < self.top_p, axis=-1, keepdims=True)  # ≥ 1
            cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)  # smallest kept logit
            logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
        if self.min_p is not None:
            probs = jax.nn.softmax(logits, axis=-1)
            keep = probs >= self.min_p * jnp.max(probs, axis=-1, keepdims=True)
            logits = jnp.where(keep, logits, -jnp.inf)  # the most probable id always stays
        return logits

    def draw(self, logits, key):
        """Processed logits [b, V] fp32, key -> ids [b] int32 drawn from softmax(logits)."""
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    def sample(self, logits, key):
        """logits [b, V] fp32, key -> ids [b] int32 drawn from softmax(process(logits))."""
        return self.draw(self.process(logits), key)


def _flatten_sampling(s: Sampling):
    return (s.temperature, s.top_p, s.min_p), s.top_k


def _unflatten_sampling(top_k, leaves):
    s = object.__new__(Sampling)  # leaves may be tracers: no validation here
    for name, value in zip(("temperature", "top_p", "min_p"), leaves, strict=True):
        object.__setattr__(s, name, value)
    object.__setattr__(s, "top_k", top_k)
    return s


jax.tree_util.register_pytree_node(Greedy, lambda g: ((), None), lambda _, __: Greedy())
jax.tree_util.register_pytree_node(Sampling, _flatten_sampling, _unflatten_sampling)

Sampler = Greedy | Sampling


def make_sampler(temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None) -> Sampler:
    """`Greedy()` at temperature 0, else `Sampling(...)`.

    Raises:
      ValueError: a negative temperature, or top_k / top_p / min_p with temperature 0 (greedy
        ignores them; asking for both is almost certainly a mistake).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if temperature == 0:
        if top_k is not None or top_p is not None or min_p is not None:
            raise ValueError(
                f"top_k={top_k!r} / top_p={top_p!r} / min_p={min_p!r} need temperature > 0 "
                "(temperature 0 is greedy)"
            )
        return Greedy()
    return Sampling(float(temperature), top_k, top_p, min_p)


def sample_logits(logits, key, sampler: Sampler, vocab_size: int):
    """Next-token ids [b] int32 from logits [b, V]: padded ids masked, then `sampler`."""
    return sampler.sample(mask_padded_vocab(logits.astype(f32), vocab_size), key)
