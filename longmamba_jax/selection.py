"""LongMamba's token-selection rules: which tokens a global channel keeps (Δ_eff = Δ) and which
it drops (Δ_eff = 0), docs/design.md, "LongMamba filtering".

Every rule sees one layer's Δ (after softplus, [b, l, C] fp32), the layer's global channels
(is_global [C]) and one calibrated number per channel (`param` [C]), and returns Δ_eff. Local
channels are never changed. Notation: L the prompt length, v = a channel's Δ sorted descending
(per batch row: every row is its own prompt).

  "threshold"         keep Δ > θ_S                  θ_S from the calibration at S = L (param)
  "channelwise_topk"  keep Δ > quantile(Δ, 1 − k/L)  (linear interpolation; k fixed)
  "all_topk"          keep the k tokens of largest ‖Δ_t‖₂ over the global channels, in all of them
  "alpha"             keep the ⌈α·L⌉ largest         α from the calibration at S = L (param)
  "offline"           keep Δ ≥ v[⌊α·L⌋]               the α-quantile of the prompt's own Δ
  "bound"             keep the m largest, m = #{j : Σ_{i≤j} v_i ≤ decay}   decay calibrated (param)
  "norm"              Δ := Δ · decay / Σ_t Δ          (every token kept, rescaled)
  "budget"            keep the ⌈decay / q⌉ largest     decay and clamp value q calibrated: the
                      tokens whose clamped Δ fills the training window's decay (not published)

All but "norm" and "all_topk" are a per-channel threshold on Δ (`keep_threshold`), so they run
through the same filter as "threshold": Δ_eff = where(Δ <= t, 0, Δ). The prompt-adaptive ones
need the whole prompt's Δ before the scan; they are computed in XLA from Δ, per batch row, by a
bisection over Δ's fp32 bit patterns (no sort; docs/design.md, "The other token-selection rules").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

f32 = jnp.float32

RULES = ("threshold", "channelwise_topk", "all_topk", "alpha", "offline", "bound", "norm",
         "budget")
# What `param` holds for each rule (the calibration quantity LongMamba reads for it).
RULE_PARAM = {
    "threshold": "theta", "channelwise_topk": None, "all_topk": None, "alpha": "alpha",
    "offline": "alpha", "bound": "decay", "norm": "decay", "budget": "count",
}


@dataclasses.dataclass(frozen=True)
class SelectionRule:
    """A token-selection rule (static under jit).

    Attributes:
      kind: one of `RULES`.
      k: tokens kept per channel ("channelwise_topk") or per prompt ("all_topk"); ignored by the
        others.
    """

    kind: str = "threshold"
    k: int = 2000

    def __post_init__(self):
        if self.kind not in RULES:
            raise ValueError(f"unknown LongMamba rule {self.kind!r}; choose one of {RULES}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"rule k must be a positive int, got {self.k!r}")

    @property
    def adaptive(self) -> bool:
        """Whether the rule reads the prompt's own Δ (anything but a fixed θ per channel)."""
        return self.kind != "threshold"


# Every threshold below is the smallest float t >= 0 at which a monotone test on Δ passes (an
# order statistic of Δ, or the bound rule's sum cut), found without sorting: a bisection over the
# fp32 bit patterns, which order the non-negative floats like their values (Δ >= 0: a softplus
# output, padded positions 0). Each pass tests _WAYS - 1 patterns at once per (row, channel) in
# one reduction over l that reads Δ once, and keeps the 1/_WAYS of [lo, hi] holding the answer.
# From [+0, +inf] (0x7F800001 patterns, under 2^31) _PASSES passes leave one pattern
# (docs/design.md, "The other token-selection rules").
_WAYS = 16
_INF_BITS = 0x7F800000  # +inf; every non-negative float's pattern lies in [0, _INF_BITS]
_PASSES = next(p for p in range(1, 32) if _WAYS ** p > _INF_BITS)  # 8


def _smallest_passing(dt, passes):
    """The smallest float t in [+0, +inf] with passes(t), per row and channel, [b, C] fp32.

    `passes(t)` maps candidates t [b, C, K] fp32 to bool [b, C, K] and must be monotone in t
    (false below the answer, true from it on); +inf counts as passing without being tested, so
    a test that never passes gives +inf.
    """
    b, _, c = dt.shape
    lo = jnp.zeros((b, c), jnp.int32)
    hi = jnp.full((b, c), _INF_BITS, jnp.int32)
    k = jnp.arange(1, _WAYS, dtype=jnp.int32)  # [K]
    for _ in range(_PASSES):  # unrolled: a fixed number of fused reductions, no while loop
        # [lo, hi] in _WAYS blocks of `step` patterns; test the last pattern of all but the last.
        step = (hi - lo) // _WAYS + 1  # ceil((hi - lo + 1) / _WAYS), [b, C]
        cand = lo[..., None] + k * step[..., None] - 1  # [b, C, K], at most hi + _WAYS - 2
        fails = (cand < hi[..., None]) & ~passes(jax.lax.bitcast_convert_type(cand, f32))
        j = jnp.sum(fails, axis=-1, dtype=jnp.int32)  # candidates below the answer (a prefix)
        lo, hi = lo + j * step, jnp.minimum(lo + (j + 1) * step - 1, hi)
    return jax.lax.bitcast_convert_type(lo, f32)


def _count_above(dt, t):
    """#{Δ > t} along l: dt [b, l, C], t [b, C, K] -> [b, C, K] int32."""
    return jnp.sum(dt[..., None] > t[:, None], axis=1, dtype=jnp.int32)


def _order_statistic(dt, n):
    """v[n], the (n+1)-th largest Δ along l, for n [C] or [b, C] int in [0, L): the smallest t
    with #{Δ > t} <= n, ties included (#{Δ > v[n]} <= n, and any t < v[n] leaves v[0..n] above
    it). [b, C] fp32."""
    n = jnp.broadcast_to(n, (dt.shape[0], dt.shape[2]))[..., None]  # [b, C, 1]
    return _smallest_passing(dt, lambda t: _count_above(dt, t) <= n)


def _value_at(dt, index):
    """v[index] for index [C] int (v: Δ sorted descending along l); an index past the end gives
    -inf (keep everything), a negative one v[0]. [b, C] fp32."""
    length = dt.shape[1]
    got = _order_statistic(dt, jnp.clip(index, 0, length - 1))
    return jnp.where(index < length, got, -jnp.inf)


def _bound_threshold(dt, decay):
    """The "bound" rule's t = v[m], m = #{j : Σ_{i≤j} v_i <= decay} (m = L: -inf), [b, C].

    t is the smallest float with f(t) = Σ_{Δ > t} Δ <= decay. Proof, ties included, for
    decay >= 0 and m < L: f(v[m]) sums only values above v[m], a subset of v[0..m-1], so
    f(v[m]) <= Σ_{i<m} v_i <= decay; any t < v[m] leaves every copy of v[m] above it, so
    f(t) >= Σ_{i≤m} v_i > decay. m = L exactly when f(+0) = Σ Δ <= decay (then the search
    gives +0, which v[m] never is: v[m] = 0 would make Σ_{i≤m} = Σ_{i<m}). decay < 0 (or NaN)
    gives m = 0, v[0], found as the smallest t with f(t) <= 0 and never -inf.
    The sums are fp32 in reduction order here, in sorted-prefix order in the definition: the
    two can differ only where rounding moves a sum across decay (never on values whose sums
    are exact, such as dyadic ones). The test stays monotone in t: in one summation order, the
    rounded sum of fewer non-negative terms never exceeds that of more.
    """
    decay = jnp.broadcast_to(decay, (dt.shape[0], dt.shape[2]))  # [b, C]
    usable = decay >= 0
    cap = jnp.where(usable, decay, 0.0)[..., None]  # [b, C, 1]

    def passes(t):  # t [b, C, K]
        kept = jnp.where(dt[..., None] > t[:, None], dt[..., None], 0.0)  # [b, l, C, K]
        return jnp.sum(kept, axis=1) <= cap

    t = _smallest_passing(dt, passes)
    return jnp.where(usable & (t == 0), -jnp.inf, t)


def keep_threshold(dt, param, rule: SelectionRule):
    """The per-row, per-channel threshold t [b, C] of a threshold-form rule: a global channel
    keeps Δ > t. For "offline" (which keeps Δ ≥ v[j]) t is the next float below v[j].

    The order statistics are found by bisection over Δ's bit patterns, without sorting
    (`_smallest_passing`); Δ must be >= 0.

    Args:
      dt: [b, l, C] fp32 Δ (>= 0). param: [C] fp32 (θ_S, α or decay; unused by
        "channelwise_topk").
      rule: a threshold-form `SelectionRule` (not "norm" or "all_topk").
    """
    b, length, c = dt.shape
    kind = rule.kind
    if kind == "threshold":
        return jnp.broadcast_to(param.astype(f32), (b, c))
    if kind == "channelwise_topk":
        # torch.quantile(Δ, 1 − k/L), linear interpolation between the order statistics
        # asc[lo] and asc[lo + 1] (asc: Δ ascending; asc[i] = v[L − 1 − i]).
        q = 1.0 - min(rule.k, length) / length
        pos = q * (length - 1)
        lo, frac = int(pos // 1), pos - int(pos // 1)
        below = _order_statistic(dt, jnp.int32(length - 1 - lo))  # asc[lo]
        if frac == 0:  # asc[lo] + 0·(asc[hi] − asc[lo]) is asc[lo]
            return below
        # asc[lo + 1] is asc[lo] again if more than lo + 1 values are <= it, else the next
        # larger Δ: one more pass.
        ties = jnp.sum(dt <= below[:, None], axis=1) >= lo + 2
        above = jnp.where(ties, below, jnp.min(jnp.where(dt > below[:, None], dt, jnp.inf),
                                               axis=1))
        return below + frac * (above - below)
    if kind == "alpha":
        n_keep = jnp.ceil(jnp.minimum(param.astype(f32) * length, length)).astype(jnp.int32)
        return _value_at(dt, n_keep)
    if kind == "budget":
        n_keep = jnp.ceil(jnp.minimum(param.astype(f32), length)).astype(jnp.int32)
        return _value_at(dt, n_keep)
    if kind == "offline":
        j = jnp.minimum(jnp.floor(param.astype(f32) * length), length - 1).astype(jnp.int32)
        return jnp.nextafter(_value_at(dt, j), -jnp.inf)
    if kind == "bound":
        return _bound_threshold(dt, param.astype(f32))
    raise ValueError(f"rule {kind!r} is not a threshold on Δ")


def apply_document_thresholds(dt, is_global, threshold, doc):
    """The fixed-threshold rule with one θ per packed document: Δ_eff = 0 where a global channel's
    Δ <= θ of the token's own document.

    Args:
      dt: [b, l, C] fp32 Δ. is_global: [C] bool. threshold: [b, D, C] fp32, θ per document
        (−inf for a document too short to filter). doc: [b, l] int32 document index per token.
    """
    thr = jnp.take_along_axis(threshold, doc[..., None], axis=1)  # [b, l, C]
    return jnp.where(jnp.asarray(is_global, bool) & (dt <= thr), 0.0, dt)


def apply_rule(dt, is_global, param, rule: SelectionRule):
    """Δ_eff of one layer under `rule`.

    Args:
      dt: [b, l, C] fp32 Δ (after softplus; padded positions hold 0).
      is_global: [C] bool, the layer's global channels.
      param: [C] fp32, the rule's calibrated quantity (see `RULE_PARAM`), already scaled.
      rule: the `SelectionRule`.

    Returns:
      Δ_eff [b, l, C] fp32: dt in local channels, the rule's choice in global ones.
    """
    glob = jnp.asarray(is_global, bool)
    if rule.kind == "norm":
        total = jnp.sum(dt, axis=1, keepdims=True)  # [b, 1, C]
        scale = jnp.where(total > 0, param.astype(f32) / jnp.where(total > 0, total, 1.0), 1.0)
        return jnp.where(glob, dt * scale, dt)
    if rule.kind == "all_topk":
        length = dt.shape[1]
        score = jnp.sqrt(jnp.sum(jnp.where(glob, dt, 0.0) ** 2, axis=-1))  # [b, l]
        _, top = jax.lax.top_k(score, min(rule.k, length))
        keep = jnp.zeros(score.shape, bool).at[jnp.arange(dt.shape[0])[:, None], top].set(True)
        return jnp.where(glob & ~keep[..., None], 0.0, dt)
    t = keep_threshold(dt, param, rule)  # [b, C]
    return jnp.where(glob & (dt <= t[:, None, :]), 0.0, dt)
