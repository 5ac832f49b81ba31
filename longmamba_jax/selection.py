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
need the whole prompt's Δ before the scan; they are computed in XLA from Δ, per batch row.
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


def _sorted_desc(dt):
    """Δ [b, l, C] -> sorted descending along l, [b, l, C]."""
    return -jnp.sort(-dt, axis=1)


def _value_at(v, index):
    """v [b, l, C] sorted descending, index [b, C] or [C] int -> v[b, index, C]; an index past
    the end gives -inf (keep everything)."""
    length = v.shape[1]
    index = jnp.broadcast_to(index, (v.shape[0], v.shape[2]))
    got = jnp.take_along_axis(v, jnp.clip(index, 0, length - 1)[:, None, :], axis=1)[:, 0]
    return jnp.where(index < length, got, -jnp.inf)


def keep_threshold(dt, param, rule: SelectionRule):
    """The per-row, per-channel threshold t [b, C] of a threshold-form rule: a global channel
    keeps Δ > t. For "offline" (which keeps Δ ≥ v[j]) t is the next float below v[j].

    Args:
      dt: [b, l, C] fp32 Δ. param: [C] fp32 (θ_S, α or decay; unused by "channelwise_topk").
      rule: a threshold-form `SelectionRule` (not "norm" or "all_topk").
    """
    b, length, c = dt.shape
    kind = rule.kind
    if kind == "threshold":
        return jnp.broadcast_to(param.astype(f32), (b, c))
    if kind == "channelwise_topk":
        # torch.quantile(Δ, 1 − k/L), linear interpolation between the order statistics.
        q = 1.0 - min(rule.k, length) / length
        pos = q * (length - 1)
        lo, frac = int(pos // 1), pos - int(pos // 1)
        asc = jnp.sort(dt, axis=1)
        hi = min(lo + 1, length - 1)
        return asc[:, lo] + frac * (asc[:, hi] - asc[:, lo])
    v = _sorted_desc(dt)
    if kind == "alpha":
        n_keep = jnp.ceil(jnp.minimum(param.astype(f32) * length, length)).astype(jnp.int32)
        return _value_at(v, n_keep)
    if kind == "budget":
        n_keep = jnp.ceil(jnp.minimum(param.astype(f32), length)).astype(jnp.int32)
        return _value_at(v, n_keep)
    if kind == "offline":
        j = jnp.minimum(jnp.floor(param.astype(f32) * length), length - 1).astype(jnp.int32)
        return jnp.nextafter(_value_at(v, j), -jnp.inf)
    if kind == "bound":
        n_keep = jnp.sum(jnp.cumsum(v, axis=1) <= param.astype(f32), axis=1)  # [b, C]
        return _value_at(v, n_keep.astype(jnp.int32))
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
