"""The LongMamba calibration rule ("align targets"), per row (one window x one channel), in
float64 numpy. Notation: window length ``L = train_len``, target length S > L.

1. clamp:  ``k = max(1, floor(rho * L))``; ``q = k-th largest Δ[:, c]``; ``Δc := min(Δc, q)``.
2. decay:  ``decay = Σ_t Δc[t]``.
3. threshold: ``y = sort(Δc, descending)``; ``v = resample(y, S)`` with PyTorch
   ``interpolate(mode="linear", align_corners=False)`` semantics (output i reads input position
   ``(i + 0.5) * L / S - 0.5`` clamped to ``[0, L - 1]``); ``C = cumsum(v)``;
   ``k = first index with C[k] > decay``; ``θ_S = v[k + 1]``.

Edge cases follow the published code (``load_align_target.py`` of GATECH-EIC/LongMamba): the
comparison is strict; if the cumsum never exceeds ``decay``, ``argmax`` of an all-false row is 0,
so ``θ = v[1]``; ``k + 1 == S`` takes the last value. θ_S is non-decreasing in S and equals ``q``
for every ``S >= S*`` (`const_from`). docs/design.md, "LongMamba calibration", has the
derivations.
"""

from __future__ import annotations

import numpy as np

CHUNK_ELEMS = 1 << 22  # working-set bound (elements) for chunked numpy passes


def clamp_sort(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Clamps and sorts one layer's Δ.

    Args:
      d: ``[w, l, c]`` Δ (after softplus), any float dtype.
      k: number of top values that define the clamp value.

    Returns:
      y: ``[w, c, l]`` float64, clamped Δ sorted descending.
      decay: ``[w, c]`` float64, Σ_t clamped Δ.
    """
    w, length, c = d.shape
    y = np.empty((w, c, length), np.float64)
    step = max(1, CHUNK_ELEMS // max(1, w * length))
    for c0 in range(0, c, step):
        blk = np.sort(d[:, :, c0 : c0 + step].transpose(0, 2, 1), axis=-1)  # [w, c', l]
        blk = blk[..., ::-1].astype(np.float64)  # descending; sorting is exact in any dtype
        q = blk[..., k - 1 : k]  # k-th largest
        y[:, c0 : c0 + step] = np.minimum(blk, q)
    return y, y.sum(axis=-1)


def const_from(y: np.ndarray, decay: np.ndarray) -> np.ndarray:
    """Smallest length S* from which θ_S equals the clamp value q, per row (conservative).

    Args:
      y: ``[..., l]`` sorted clamped curves; decay: ``[...]``.

    Returns:
      ``[...]`` int64.
    """
    length = y.shape[-1]
    q = y[..., 0]
    kc = (y == q[..., None]).sum(axis=-1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        j = np.floor(np.where(q > 0, decay / np.where(q > 0, q, 1.0), 0.0)) + 1.0
        s = np.ceil((j + 1.5) * length / (kc - 0.5)) + 1.0
    s = np.where(q > 0, s, length + 1)
    return np.maximum(s, length + 1).astype(np.int64)


def resample_positions(length: int, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Torch ``interpolate(linear, align_corners=False)`` source indices and weights for L -> S."""
    pos = np.maximum((np.arange(s, dtype=np.float64) + 0.5) * (length / s) - 0.5, 0.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), length - 1)
    i1 = np.minimum(i0 + 1, length - 1)
    lam = np.clip(pos - i0, 0.0, 1.0)
    return i0, i1, lam


def exact_cut_rows(y: np.ndarray, decay: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule of step 3, evaluated directly: θ_S and the kept fraction α_S per row.

    α_S = (k + 1) / S, capped at 1, is the published "alpha" (the share of the S tokens whose
    sorted prefix first exceeds the decay).

    Args:
      y: ``[r, l]`` float64 sorted clamped curves; decay: ``[r]``; s: target length (> 1).

    Returns:
      (θ_S ``[r]`` float64, α_S ``[r]`` float64).
    """
    r, length = y.shape
    i0, i1, lam = resample_positions(length, s)
    theta, alpha = np.empty(r, np.float64), np.empty(r, np.float64)
    step = max(1, CHUNK_ELEMS // s)
    for r0 in range(0, r, step):
        yb = y[r0 : r0 + step]
        v = yb[:, i0] * (1.0 - lam) + yb[:, i1] * lam  # [r', s]
        hit = np.cumsum(v, axis=1) > decay[r0 : r0 + step, None]
        k = np.where(hit.any(axis=1), np.argmax(hit, axis=1), 0)  # torch: argmax(all False) = 0
        idx = np.minimum(k + 1, s - 1)
        theta[r0 : r0 + step] = v[np.arange(len(yb)), idx]
        alpha[r0 : r0 + step] = np.minimum((k + 1) / s, 1.0)
    return theta, alpha


def exact_theta_rows(y: np.ndarray, decay: np.ndarray, s: int) -> np.ndarray:
    """θ_S per row of `exact_cut_rows`."""
    return exact_cut_rows(y, decay, s)[0]


def fast_theta_rows(y: np.ndarray, decay: np.ndarray, grid_s: np.ndarray) -> np.ndarray:
    """θ_S per row for many S at once, by inverting the integral of the interpolated curve.

    Output i of the resample stands for the input cell ``[i r - 0.5, (i + 1) r - 0.5]``
    (r = L / S), so ``C[j] ≈ (Y(-0.5 → (j + 1) r - 0.5)) / r`` with Y the piecewise-linear curve
    (constant outside ``[0, L - 1]``): exact except for cells that straddle a knot. Solving
    ``Y(-0.5 → x) = decay * r`` gives ``k = floor((x + 0.5) / r)``; θ is then read exactly at
    output k + 1 with the edge cases of the exact rule.

    Args:
      y: ``[r, l]`` float64 sorted clamped curves; decay: ``[r]``; grid_s: ``[n]`` int lengths.

    Returns:
      ``[r, n]`` float64.
    """
    rows, length = y.shape
    s = grid_s.astype(np.float64)[None, :]  # [1, n]
    ratio = length / s
    if length == 1:  # every output reads y[0]
        return np.broadcast_to(y[:, :1], (rows, len(grid_s))).copy()
    # integral of the interpolant from 0 to each knot, [r, l]
    knots = np.zeros_like(y)
    knots[:, 1:] = np.cumsum(0.5 * (y[:, :-1] + y[:, 1:]), axis=1)
    t = decay[:, None] * ratio - 0.5 * y[:, :1]  # target integral from 0 to x, [r, n]
    # segment m with knots[m] <= t, found per row by one searchsorted over offset rows
    span = float(max(knots[:, -1].max(), np.abs(t).max())) + 1.0
    offs = np.arange(rows, dtype=np.float64)[:, None] * (2.0 * span)
    m = np.searchsorted((knots + offs).ravel(), (t + offs).ravel(), side="right")
    m = m.reshape(rows, -1) - 1 - np.arange(rows)[:, None] * length
    m = np.clip(m, 0, length - 2)
    ym = np.take_along_axis(y, m, axis=1)
    slope = np.take_along_axis(y, m + 1, axis=1) - ym
    rem = t - np.take_along_axis(knots, m, axis=1)
    # 0.5 slope tau^2 + ym tau = rem, stable root
    root = np.sqrt(np.maximum(ym * ym + 2.0 * slope * rem, 0.0))
    den = ym + root
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = np.where(den > 0, 2.0 * rem / den, 0.0)
        x = m + np.clip(tau, 0.0, 1.0)
        y0 = y[:, :1]
        x = np.where(t < 0, t / np.where(y0 > 0, y0, 1.0), x)
        last, ylast = knots[:, -1:], y[:, -1:]
        beyond = (length - 1) + (t - last) / np.where(ylast > 0, ylast, 1.0)
        x = np.where(t >= last, np.where(ylast > 0, beyond, np.inf), x)
        kk = np.floor((x + 0.5) / ratio)
    never = ~(kk < s)
    idx = np.where(never, 1.0, np.minimum(np.maximum(kk, 0.0) + 1.0, s - 1.0))
    pos = np.maximum((idx + 0.5) * ratio - 0.5, 0.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), length - 1)
    i1 = np.minimum(i0 + 1, length - 1)
    lam = np.clip(pos - i0, 0.0, 1.0)
    return np.take_along_axis(y, i0, 1) * (1 - lam) + np.take_along_axis(y, i1, 1) * lam


def aggregate_windows(x: np.ndarray, how: str) -> np.ndarray:
    """Aggregates over windows (axis 0)."""
    return x.mean(axis=0) if how == "mean" else x.max(axis=0)

