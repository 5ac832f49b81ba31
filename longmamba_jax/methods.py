"""Training-free context extension: LongMamba and DeciMamba (docs/design.md).

A method turns a prompt length into extra inputs of `apply_model` (`model_kwargs`), so every
backend applies it inside the same compiled forward:

- LongMamba: per-SSM-layer arrays (is_global [n_ssm_layer, C], threshold [n_ssm_layer, C];
  a hybrid model's attention layers have none); in global
  channels Δ_eff = Δ if Δ > scale·θ_S else 0, everywhere Δ enters the scan. Off (no extra inputs,
  bit-identical to vanilla) when S <= min_len or when no channel is global.
- DeciMamba: a static plan ((layer, keep, keep_last), ...); in each decimating layer only the
  `keep` tokens with the largest ‖Δ‖₂ (plus the last keep_last) continue, in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref

import jax.numpy as jnp
import numpy as np

from longmamba_jax.config import Config
from longmamba_jax.model import LayerFilters
from longmamba_jax.selection import RULE_PARAM, SelectionRule


@dataclasses.dataclass(frozen=True, eq=False)
class LongMamba:
    """LongMamba filtering of low-Δ tokens in the global channels.

    Args:
      calibration: a `Calibration` of this model (see `longmamba_jax.calibrate`).
      channel_threshold: c_thr; channels whose decay fraction tA_prod exceeds it are global.
      scale: b; a token is kept in a global channel when Δ > b·θ_S (for the other rules b
        scales their calibrated quantity: α for "alpha"/"offline", the decay for
        "bound"/"norm"; the top-k rules ignore it).
      rule: which tokens global channels keep (`longmamba_jax.selection`): "threshold" (the
        paper's default, θ_S from the calibration), "channelwise_topk", "all_topk", "alpha",
        "offline", "bound" or "norm". All but "threshold" read the prompt's own Δ, so they
        need the whole prompt in one call (no `prefill_chunked`, no `filter_decode`).
      k: tokens kept by the top-k rules (default: the calibration's train_len).
      min_len: filtering is on only for prompts longer than this (default: the calibration's
        train_len; the published code used 3,000 for train_len 2,000). Must be >= train_len.
      filter_decode: also filter decode steps, with θ for the final length (prompt +
        max_new_tokens, computed once before the decode loop); off as published.
      check_weights: refuse a model whose weights differ from those the calibration was
        measured on (compared by `weights_digest` when the calibration records one;
        docs/reliability.md, "Calibrations"); False uses the calibration anyway.
    """

    calibration: object
    channel_threshold: float = 0.05
    scale: float = 1.0
    min_len: int | None = None
    filter_decode: bool = False
    rule: str = "threshold"
    k: int | None = None
    check_weights: bool = True

    def __post_init__(self):
        train_len = self.calibration.train_len
        selection = SelectionRule(self.rule, train_len if self.k is None else self.k)
        object.__setattr__(self, "_selection", selection)
        object.__setattr__(self, "_filters", {})  # (fingerprint, S) -> LayerFilters | None
        if self.filter_decode and selection.adaptive:
            raise ValueError(f"filter_decode=True needs rule='threshold' (the rule {self.rule!r} "
                             "reads the whole prompt's Δ, which a decode step does not have)")
        if self.min_len is not None and self.min_len < train_len:
            raise ValueError(
                f"LongMamba min_len={self.min_len} is below the calibration's train_len="
                f"{train_len}: thresholds exist only for lengths beyond train_len"
            )
        if self.scale <= 0:
            raise ValueError(f"LongMamba scale must be positive, got {self.scale}")

    def check_params(self, params) -> None:
        """Raises ValueError if the calibration records the digest of other weights than
        `params` (once per weights object; skipped for traced weights or check_weights=False)."""
        digest = getattr(self.calibration, "weights_digest", None)
        if not self.check_weights or digest is None:
            return
        a_log = params.weights["layers"]["mixer"]["A_log"]
        checked = self.__dict__.get("_checked")
        if checked is not None and checked() is a_log:
            return
        from longmamba_jax.calibration.record import weights_digest

        mine = weights_digest(params)
        if mine is None:
            return
        if mine != digest:
            raise ValueError(
                f"calibration does not match the model: weights digest {digest} != model's "
                f"{mine} (it was measured on other weights; LongMamba(..., check_weights=False) "
                "uses it anyway)")
        with contextlib.suppress(TypeError):  # remember these weights (if they take a weakref)
            object.__setattr__(self, "_checked", weakref.ref(a_log))

    @property
    def switch_on_len(self) -> int:
        return self.calibration.train_len if self.min_len is None else self.min_len

    def active(self, seq_len: int) -> bool:
        return seq_len > self.switch_on_len

    @property
    def selection(self) -> SelectionRule:
        """The token-selection rule (static under jit)."""
        return self._selection

    def layer_filters(self, config: Config, seq_len: int) -> LayerFilters | None:
        """The filter arrays for prompt length seq_len, or None when filtering is off:
        is_global, and per channel the rule's parameter (θ_S, α or the decay, times `scale`;
        zeros for the top-k rules)."""
        cal = self.calibration
        n = config.n_ssm_layer  # hybrids: the Mamba2 layers only (docs/families.md)
        cal.check_compatible(config.fingerprint, n, [config.channels] * n)
        if not self.active(seq_len):
            return None
        key = (config.fingerprint, int(seq_len))
        if key not in self._filters:  # host work (θ_S or α_S per channel) once per length
            if len(self._filters) > 64:
                self._filters.clear()
            self._filters[key] = self._layer_filters(int(seq_len))
        return self._filters[key]

    def _layer_filters(self, seq_len: int) -> LayerFilters | None:
        cal = self.calibration
        is_global = np.stack([np.asarray(g, bool)
                              for g in cal.global_channels(self.channel_threshold)])
        if not is_global.any():
            return None
        what = RULE_PARAM[self.rule]
        if what == "theta":
            param = self.scale * np.stack([np.asarray(t, np.float64)
                                           for t in cal.thresholds(int(seq_len))])
        elif what == "alpha":
            param = self.scale * np.stack([np.asarray(a, np.float64)
                                           for a in cal.keep_fractions(int(seq_len))])
        elif what == "decay":
            param = self.scale * np.stack([np.asarray(d, np.float64) for d in cal.decay])
        elif what == "count":  # decay / q: how many clamped-Δ tokens fill the decay
            decay = np.stack([np.asarray(d, np.float64) for d in cal.decay])
            q = np.stack([np.asarray(c, np.float64) for c in cal.clamp_values])
            param = self.scale * np.where(q > 0, decay / np.where(q > 0, q, 1.0), 0.0)
        else:
            param = np.zeros(is_global.shape)
        return LayerFilters(jnp.asarray(is_global), jnp.asarray(param, jnp.float32))

    def document_filters(self, config: Config, lengths: list[list[int]]) -> LayerFilters | None:
        """Filters for packed documents: each document filtered with θ for its own length
        (threshold [n_layer, b, documents, C], −inf for documents not longer than the switch-on
        length and for the padding of rows with fewer documents), or None when none is filtered.
        Only the fixed-threshold rule: the adaptive ones read the whole row's Δ."""
        if self.selection.adaptive:
            raise ValueError(f"the LongMamba rule {self.rule!r} is not defined per packed "
                             "document; use rule='threshold' with segment_ids")
        cal = self.calibration
        n = config.n_ssm_layer
        cal.check_compatible(config.fingerprint, n, [config.channels] * n)
        longest = max(len(row) for row in lengths)
        theta = np.full((n, len(lengths), longest, config.channels), -np.inf)
        is_global = np.stack([np.asarray(g, bool)
                              for g in cal.global_channels(self.channel_threshold)])
        if not is_global.any():
            return None
        for b, row in enumerate(lengths):
            for d, n in enumerate(row):
                if self.active(n):
                    theta[:, b, d] = self.scale * np.stack(cal.thresholds(int(n)))
        if not np.isfinite(theta).any():
            return None
        return LayerFilters(jnp.asarray(is_global), jnp.asarray(theta, jnp.float32))

    def model_kwargs(self, config: Config, seq_len: int, documents=None) -> dict:
        """`apply_model` arguments at prompt length seq_len, or, for packed documents, with
        `documents` = each row's document lengths."""
        if documents is not None:
            filters = self.document_filters(config, documents)
            return {} if filters is None else {"filters": filters}
        filters = self.layer_filters(config, seq_len)
        if filters is None:
            return {}
        if self.selection.adaptive:
            return {"filters": filters, "rule": self.selection}
        return {"filters": filters}


@dataclasses.dataclass(frozen=True)
class DeciMamba:
    """DeciMamba token decimation.

    In decimating layer l_s (s = its index in `layers`), with L the length entering it, keep
    P_s = max(min(L − keep_last, ⌊L_base·β^s⌋), min_seq_len) tokens (capped at L − keep_last)
    of the first L − keep_last by ‖Δ‖₂ over channels, in order, plus the last keep_last. Later
    layers and the residual stream see only the kept tokens, so `forward` returns logits for the
    kept positions (the last keep_last are always among them, last); `forward(...,
    return_positions=True)` also gives their original positions.

    Args:
      layers: decimating layer indices (ascending, distinct).
      L_base: the base number of kept tokens.
      beta: decay of the kept count per decimating layer, in (0, 1].
      min_seq_len: never keep fewer than this many tokens.
      keep_last: trailing tokens never dropped (the question / the labels).
    """

    layers: tuple[int, ...]
    L_base: int
    beta: float = 0.5
    min_seq_len: int = 20
    keep_last: int = 1

    def __post_init__(self):
        layers = tuple(int(i) for i in self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
            raise ValueError(f"DeciMamba layers must be distinct ascending indices, got {layers}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"DeciMamba beta must be in (0, 1], got {self.beta}")
        if self.L_base < 1 or self.min_seq_len < 1 or self.keep_last < 0:
            raise ValueError(
                f"DeciMamba needs L_base >= 1, min_seq_len >= 1, keep_last >= 0; got "
                f"{self.L_base}, {self.min_seq_len}, {self.keep_last}"
            )

    def plan(self, config: Config, seq_len: int) -> tuple[tuple[int, int, int], ...]:
        """((layer, keep, keep_last), ...) for a prompt of seq_len tokens; layers where nothing
        would be dropped are left out."""
        if config.family in ("zamba2", "bamba"):
            raise ValueError(f"DeciMamba is not supported on {config.family}: decimation would "
                             "drop tokens from its attention layers' context too")
        if self.layers[-1] >= config.n_layer:
            raise ValueError(f"DeciMamba layer {self.layers[-1]} does not exist (the model has "
                             f"{config.n_layer} layers)")
        if seq_len < self.keep_last:
            raise ValueError(f"DeciMamba keep_last={self.keep_last} exceeds the prompt length "
                             f"{seq_len}")
        out, length = [], seq_len
        for s, layer in enumerate(self.layers):
            head = length - self.keep_last
            keep = max(min(head, math.floor(self.L_base * self.beta**s)), self.min_seq_len)
            keep = min(keep, head)
            if keep < head:
                out.append((layer, keep, self.keep_last))
                length = keep + self.keep_last
        return tuple(out)

    def model_kwargs(self, config: Config, seq_len: int, documents=None) -> dict:
        if documents is not None:
            raise ValueError("DeciMamba decimates a whole row; it is not supported with packed "
                             "documents (segment_ids / cu_seqlens)")
        plan = self.plan(config, seq_len)
        return {"decimation": plan} if plan else {}
