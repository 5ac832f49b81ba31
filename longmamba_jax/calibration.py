"""LongMamba calibration ("align targets", SPEC §3.1): the pure math and the on-disk artifact.

Notation: layer l, window w (of ``L = train_len`` tokens), channel c (an inner channel of
Mamba-1 or a head of Mamba2), target length S > L. Per window, layer and channel:

1. clamp:  ``k = max(1, floor(rho * L))``; ``q = k-th largest Δ[:, c]``; ``Δc := min(Δc, q)``.
2. decay:  ``decay = Σ_t Δc[t]``; ``tA_prod = exp(A[c] * decay)`` (Mamba2, A = -exp(A_log));
   Mamba-1 has ``A[c, n]``: ``slowest_state="max"`` (default) uses the slowest state,
   ``exp(max_n A[c, n] * decay)``; ``"mean"`` uses ``mean_n exp(A[c, n] * decay)``.
3. threshold: ``y = sort(Δc, descending)``; ``v = resample(y, S)`` with PyTorch
   ``interpolate(mode="linear", align_corners=False)`` semantics, i.e. output i reads input
   position ``p_i = (i + 0.5) * L / S - 0.5`` clamped to ``[0, L - 1]`` and interpolates linearly;
   ``C = cumsum(v)``; ``k = first index with C[k] > decay``; ``θ_S = v[k + 1]``.

``tA_prod``, ``decay`` and ``θ_S`` are then aggregated over windows (``"mean"``: the published
``avg`` target; ``"max"``: the alternative).

Edge cases of step 3, following the published code (GATECH-EIC/LongMamba,
``load_align_target.py``: ``top_k = argmax(mod_dt_cum > dt_sum) + 1``;
``delta_thre = gather(mod_dt, 1, top_k)``):

* the comparison is strict (``>``);
* if the cumsum never exceeds ``decay`` (only when the resampled curve sums to at most
  ``decay``, e.g. an all-zero channel), ``argmax`` of an all-false row is 0, so ``θ = v[1]``;
* if ``k + 1 == S`` the published ``gather`` would index out of range; we take the last value
  ``v[S - 1]``;
* positions past ``L - 1`` read ``y[L - 1]`` (torch's upper index guard).

θ_S is non-*decreasing* in S (a longer sequence keeps a smaller share of its tokens, so the cut
moves up the sorted curve), and it is exactly the clamp value ``q`` once S is large enough that
the cut falls inside the clamped (flat) top of the curve: per row, for every
``S >= S* = ceil((floor(decay / q) + 2.5) * L / (kc - 0.5)) + 1`` (kc = number of values equal
to ``q``), since then the first ``floor(decay / q) + 3`` outputs all read ``q``. So θ is only a
non-trivial function of S on ``(L, S*)``, at most about ``L / rho`` tokens.

How θ is stored (``storage=``):

* ``"exact"``: the sorted clamped curves ``[windows, channels, L]`` and per-window decays;
  ``thresholds(S)`` evaluates the rule above exactly (float64) for any S. Chosen by ``"auto"``
  when ``windows * sum(channels) * L <= 2**22``, or ``<= 2**25`` with fewer than 8 windows
  (there the exact θ(S) is a staircase the grid cannot follow within 1%).
* ``"grid"``: the window-aggregated θ on a grid of integer lengths, uniform in
  ``z = log(S - L)`` with step ``grid_step`` (so every length ``L + 1 ... L + 25`` is on it), from
  ``L + 1`` to the largest ``S*``, plus anchor lengths (the published ones, 3k...192k, and
  multiples of L); ``thresholds(S)`` interpolates linearly in z between the two neighbouring grid
  points and returns the exact asymptote ``q`` (aggregated) past the grid. Grid values are
  computed per window with a fast inversion of the cumulative sum (the resampled cumsum is
  approximated by the integral of the piecewise-linear curve, midpoint rule, which is exact
  except for the cells that straddle a knot), then aggregated; values are stored as uint16 codes
  of ``-log(θ / θ_asym)`` in steps of ``1e-3`` (relative rounding ``<= 5e-4``); on disk they
  are delta-coded along S (mod 2**16), split into byte planes and deflated. Measured error
  against the exact window-mean rule is well under 1% for realistic Δ with tens of windows or
  more (``tests/test_calibration.py``); with very few windows the exact θ(S) is a staircase and
  ``storage="exact"`` should be used.

The artifact is an ``.npz`` with a JSON header (format version, library version, model
fingerprint, architecture, layer and channel counts, train_len, clamp_top, aggregate,
slowest_state, number of windows, grid description), written atomically.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Calibration", "CalibrationBuilder", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "longmamba-jax-calibration"
FORMAT_VERSION = 1

_AGGREGATES = ("mean", "max")
_SLOWEST_STATE = ("max", "mean")
_STORAGES = ("auto", "exact", "grid")
_EXACT_BUDGET = 1 << 22  # values (windows * channels * train_len) kept for storage="exact"
# With few windows the exact θ(S) is a staircase that the grid cannot follow within 1% (measured:
# 2.1% worst with 1 window, 0.84% with 4), so few-window calibrations stay exact up to a larger
# size; many-window ones are smooth and the grid is well within 1% (0.17% with 100 windows).
_FEW_WINDOWS = 8
_EXACT_BUDGET_FEW_WINDOWS = 1 << 25
_CODE_STEP = 1e-3  # quantisation step of -log(θ / θ_asym): relative rounding <= 5e-4
_ZERO_CODE = np.iinfo(np.uint16).max  # code for θ == 0
_MAX_CODE = _ZERO_CODE - 1
# Lengths at which the published code stored θ (for L_train = 2,000); kept exact on the grid.
_PUBLISHED_LENGTHS = (
    3000,
    4000,
    5000,
    6000,
    7000,
    8000,
    10000,
    12000,
    14000,
    16000,
    20000,
    24000,
    30000,
    36000,
    44000,
    54000,
    64000,
    80000,
    96000,
    120000,
    144000,
    168000,
    192000,
)
_ANCHOR_MULTIPLES = (1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 32)
_CHUNK_ELEMS = 1 << 22  # working-set bound (elements) for chunked numpy passes


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("longmamba-jax")
    except Exception:  # not installed (e.g. a source checkout on sys.path)
        return "unknown"


# ------------------------------------------------------------------------------------------
# The rule, per row (one window x one channel).
# ------------------------------------------------------------------------------------------


def _clamp_sort(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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
    step = max(1, _CHUNK_ELEMS // max(1, w * length))
    for c0 in range(0, c, step):
        blk = np.sort(d[:, :, c0 : c0 + step].transpose(0, 2, 1), axis=-1)  # [w, c', l]
        blk = blk[..., ::-1].astype(np.float64)  # descending; sorting is exact in any dtype
        q = blk[..., k - 1 : k]  # k-th largest
        y[:, c0 : c0 + step] = np.minimum(blk, q)
    return y, y.sum(axis=-1)


def _const_from(y: np.ndarray, decay: np.ndarray) -> np.ndarray:
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


def _resample_positions(length: int, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Torch ``interpolate(linear, align_corners=False)`` source indices and weights for L -> S."""
    pos = np.maximum((np.arange(s, dtype=np.float64) + 0.5) * (length / s) - 0.5, 0.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), length - 1)
    i1 = np.minimum(i0 + 1, length - 1)
    lam = np.clip(pos - i0, 0.0, 1.0)
    return i0, i1, lam


def _exact_theta_rows(y: np.ndarray, decay: np.ndarray, s: int) -> np.ndarray:
    """The rule of step 3, evaluated directly.

    Args:
      y: ``[r, l]`` float64 sorted clamped curves; decay: ``[r]``; s: target length (> 1).

    Returns:
      ``[r]`` float64 θ_S per row.
    """
    r, length = y.shape
    i0, i1, lam = _resample_positions(length, s)
    out = np.empty(r, np.float64)
    step = max(1, _CHUNK_ELEMS // s)
    for r0 in range(0, r, step):
        yb = y[r0 : r0 + step]
        v = yb[:, i0] * (1.0 - lam) + yb[:, i1] * lam  # [r', s]
        hit = np.cumsum(v, axis=1) > decay[r0 : r0 + step, None]
        k = np.where(hit.any(axis=1), np.argmax(hit, axis=1), 0)  # torch: argmax(all False) = 0
        idx = np.minimum(k + 1, s - 1)
        out[r0 : r0 + step] = v[np.arange(len(yb)), idx]
    return out


def _fast_theta_rows(y: np.ndarray, decay: np.ndarray, grid_s: np.ndarray) -> np.ndarray:
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


def _aggregate(x: np.ndarray, how: str) -> np.ndarray:
    """Aggregates over windows (axis 0)."""
    return x.mean(axis=0) if how == "mean" else x.max(axis=0)


def _make_grid(train_len: int, s_max: int, step: float) -> np.ndarray:
    """Integer lengths in (train_len, s_max], uniform in log(S - train_len), plus anchors."""
    s_max = max(int(s_max), train_len + 1)
    z_max = math.log(s_max - train_len)
    n = int(math.ceil(z_max / step)) + 1
    pts = train_len + np.round(np.exp(np.linspace(0.0, z_max, n))).astype(np.int64)
    anchors = [int(a) for a in _PUBLISHED_LENGTHS]
    anchors += [int(round(m * train_len)) for m in _ANCHOR_MULTIPLES]
    pts = np.concatenate([pts, np.asarray(anchors, np.int64), [train_len + 1, s_max]])
    pts = np.unique(pts)
    return pts[(pts > train_len) & (pts <= s_max)]


def _encode(theta: np.ndarray, asym: np.ndarray) -> np.ndarray:
    """θ -> uint16 codes of -log(θ / θ_asym) (``_ZERO_CODE`` for θ == 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = -np.log(theta / asym) / _CODE_STEP
    codes = np.clip(np.round(np.nan_to_num(z, nan=0.0, posinf=_MAX_CODE)), 0, _MAX_CODE)
    codes = codes.astype(np.uint16)
    return np.where((theta > 0) & (asym > 0), codes, np.uint16(_ZERO_CODE)).astype(np.uint16)


def _decode(codes: np.ndarray, asym: np.ndarray) -> np.ndarray:
    theta = asym * np.exp(-codes.astype(np.float64) * _CODE_STEP)
    return np.where(codes == _ZERO_CODE, 0.0, theta)


# ------------------------------------------------------------------------------------------
# The artifact.
# ------------------------------------------------------------------------------------------


class Calibration:
    """Per-layer, per-channel LongMamba calibration (SPEC §3.1); see the module docstring.

    Build with :meth:`from_deltas` (or the model-level ``calibrate``), persist with :meth:`save`
    and :meth:`load`. Per-layer lists follow the model's layer order.
    """

    def __init__(self, header: dict[str, Any], arrays: dict[str, np.ndarray]):
        """Internal: use :meth:`from_deltas` or :meth:`load`."""
        self._header = header
        self._arrays = arrays
        channels = list(header["channels"])
        self._bounds = np.concatenate([[0], np.cumsum(channels)]).astype(np.int64)
        self._cache: dict[int, list[np.ndarray]] = {}
        if header["storage"] == "exact":
            self._curves = [arrays[f"curves_{i}"].astype(np.float64) for i in range(len(channels))]
            self._wdecay = [arrays[f"window_decay_{i}"] for i in range(len(channels))]
            self._const = [
                _const_from(y, d) for y, d in zip(self._curves, self._wdecay, strict=True)
            ]

    # -------------------------------------------------------------------- construction
    @classmethod
    def from_deltas(
        cls,
        deltas: Sequence[np.ndarray],
        A: Sequence[np.ndarray],
        *,
        train_len: int,
        clamp_top: float = 0.10,
        aggregate: str = "mean",
        slowest_state: str = "max",
        fingerprint: str | None = None,
        model_info: Mapping[str, Any] | None = None,
        storage: str = "auto",
        grid_step: float = 0.04,
    ) -> Calibration:
        """Calibrates from recorded Δ.

        Args:
          deltas: list over layers of ``[windows, train_len, channels]`` Δ after softplus
            (non-negative, finite); all layers share ``windows``.
          A: list over layers of ``[channels]`` (Mamba2, ``-exp(A_log)``) or
            ``[channels, d_state]`` (Mamba-1).
          train_len: L_train; must equal ``deltas[l].shape[1]``.
          clamp_top: ρ; the clamp value is the ``max(1, floor(ρ · L))``-th largest Δ.
          aggregate: ``"mean"`` (published) or ``"max"`` over windows.
          slowest_state: Mamba-1 only: ``"max"`` -> ``exp(max_n A[c, n] · decay)``,
            ``"mean"`` -> ``mean_n exp(A[c, n] · decay)``.
          fingerprint: short model identifier, stored and compared by :meth:`check_compatible`.
          model_info: JSON-serialisable extra header fields (e.g. ``{"model_id": ...}``); an
            ``"architecture"`` entry overrides the one inferred from A's rank.
          storage: ``"auto"``, ``"exact"`` or ``"grid"`` (see the module docstring).
          grid_step: grid spacing in ``log(S - L)`` for ``storage="grid"``.

        Returns:
          A :class:`Calibration`.
        """
        train_len = _check_int("train_len", train_len, minimum=1)
        deltas = _as_layer_list("deltas", deltas, ndims=(4,))
        A = _as_layer_list("A", A, ndims=(2, 3))
        if len(deltas) == 0:
            raise ValueError("deltas is empty: need at least one layer")
        if len(A) != len(deltas):
            raise ValueError(f"len(A)={len(A)} does not match len(deltas)={len(deltas)}")
        _check_options(clamp_top, aggregate, slowest_state, storage, grid_step, fingerprint)
        windows = _check_deltas(deltas, A, train_len)
        builder = CalibrationBuilder(
            A, train_len=train_len, num_windows=windows, clamp_top=clamp_top,
            aggregate=aggregate, slowest_state=slowest_state, storage=storage,
            grid_step=grid_step,
        )
        builder._add_checked(deltas, windows)  # validated above: one pass over the data
        return builder.finish(fingerprint=fingerprint, model_info=model_info)

    # -------------------------------------------------------------------- accessors
    def _split(self, flat: np.ndarray) -> list[np.ndarray]:
        b = self._bounds
        return [flat[b[i] : b[i + 1]].copy() for i in range(len(b) - 1)]

    @property
    def header(self) -> dict[str, Any]:
        """A copy of the JSON header."""
        return json.loads(json.dumps(self._header))

    @property
    def fingerprint(self) -> str | None:
        return self._header["fingerprint"]

    @property
    def n_layers(self) -> int:
        return int(self._header["n_layers"])

    @property
    def channels(self) -> list[int]:
        return list(self._header["channels"])

    @property
    def train_len(self) -> int:
        return int(self._header["train_len"])

    @property
    def storage(self) -> str:
        return self._header["storage"]

    @property
    def decay_fraction(self) -> list[np.ndarray]:
        """List over layers of ``[channels]`` float32: aggregated ``tA_prod`` (surviving memory)."""
        return self._split(self._arrays["decay_fraction"])

    @property
    def decay(self) -> list[np.ndarray]:
        """List over layers of ``[channels]`` float32: aggregated Σ_t clamped Δ."""
        return self._split(self._arrays["decay"])

    def global_channels(self, threshold: float = 0.05) -> list[np.ndarray]:
        """List over layers of ``[channels]`` bool: ``decay_fraction > threshold``."""
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        return [f > threshold for f in self.decay_fraction]

    def thresholds(self, seq_len: int) -> list[np.ndarray]:
        """θ for a sequence of ``seq_len`` tokens.

        Args:
          seq_len: integer S with ``S > train_len`` (filtering is only defined past L_train).

        Returns:
          List over layers of ``[channels]`` float32 θ_S (aggregated over windows).
        """
        s = _check_int("seq_len", seq_len, minimum=1)
        if s <= self.train_len:
            raise ValueError(
                f"seq_len={s} must exceed train_len={self.train_len}: LongMamba thresholds are "
                "only defined past the training length"
            )
        if s not in self._cache:
            if self.storage == "exact":
                out = [self._exact_layer(i, s) for i in range(self.n_layers)]
                flat = np.concatenate(out).astype(np.float32)
            else:
                flat = self._grid_thresholds(s).astype(np.float32)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[s] = flat
        return self._split(self._cache[s])

    def _exact_layer(self, i: int, s: int) -> np.ndarray:
        y, wd, cst = self._curves[i], self._wdecay[i], self._const[i]
        w, c, length = y.shape
        theta = y[:, :, 0].copy()  # the asymptote q, exact for s >= S*
        need = s < cst
        if need.any():
            theta[need] = _exact_theta_rows(y[need], wd[need], s)
        return _aggregate(theta, self._header["aggregate"])

    def _grid_thresholds(self, s: int) -> np.ndarray:
        grid_s = self._arrays["grid_s"]
        asym = self._arrays["theta_asym"].astype(np.float64)
        codes = self._arrays["theta_codes"]
        if s >= grid_s[-1]:
            return asym
        j = int(np.searchsorted(grid_s, s, side="right")) - 1  # grid_s[j] <= s < grid_s[j+1]
        lo = _decode(codes[j], asym)
        if grid_s[j] == s:
            return lo
        hi = _decode(codes[j + 1], asym)
        length = self.train_len
        z0, z1 = math.log(grid_s[j] - length), math.log(grid_s[j + 1] - length)
        wgt = (math.log(s - length) - z0) / (z1 - z0)
        return (1.0 - wgt) * lo + wgt * hi

    # -------------------------------------------------------------------- compatibility
    def check_compatible(self, fingerprint: str | None, n_layers: int, channels: Sequence[int]):
        """Raises ValueError unless this calibration was made for the described model.

        Args:
          fingerprint: the model's fingerprint (compared when both sides have one).
          n_layers: the model's layer count.
          channels: per-layer channel counts (E for Mamba-1, heads for Mamba2).
        """
        problems = []
        mine = self._header["fingerprint"]
        if fingerprint is not None and mine is not None and fingerprint != mine:
            problems.append(f"fingerprint {mine!r} != model's {fingerprint!r}")
        if int(n_layers) != self.n_layers:
            problems.append(f"n_layers {self.n_layers} != model's {int(n_layers)}")
        if [int(c) for c in channels] != self.channels:
            problems.append(f"channels {_short(self.channels)} != model's {_short(channels)}")
        if problems:
            raise ValueError("calibration does not match the model: " + "; ".join(problems))

    # -------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Writes the artifact (``.npz`` with a JSON header) atomically to exactly ``path``."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"directory of path={path!r} does not exist")
        arrays = dict(self._arrays)
        if "theta_codes" in arrays:
            arrays["theta_codes"] = _pack_codes(arrays["theta_codes"])
        buf = io.BytesIO()
        np.savez_compressed(buf, header=np.asarray(json.dumps(self._header)), **arrays)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".calibration-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, expect: Mapping[str, Any] | None = None
    ) -> Calibration:
        """Reads an artifact written by :meth:`save`.

        Args:
          path: the file.
          expect: optional ``{"fingerprint": str, "n_layers": int, "channels": [int, ...]}``
            (any subset); a mismatch raises ValueError naming it.

        Returns:
          The :class:`Calibration`.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"calibration file not found: {path!r}")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except Exception as e:
            raise ValueError(f"{path!r} is not a calibration artifact: {e}") from None
        if "header" not in arrays:
            raise ValueError(f"{path!r} is not a calibration artifact (no header)")
        header = json.loads(str(arrays.pop("header")))
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"{path!r}: format {header.get('format')!r} is not {FORMAT_NAME!r}")
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path!r}: unsupported format_version {header.get('format_version')!r} "
                f"(this library reads version {FORMAT_VERSION})"
            )
        required = {"decay_fraction", "decay", "theta_asym"}
        if header.get("storage") == "grid":
            required |= {"grid_s", "theta_codes"}
        elif header.get("storage") == "exact":
            required |= {f"curves_{i}" for i in range(header["n_layers"])}
            required |= {f"window_decay_{i}" for i in range(header["n_layers"])}
        else:
            raise ValueError(f"{path!r}: unknown storage {header.get('storage')!r}")
        missing = sorted(required - set(arrays))
        if missing:
            raise ValueError(f"{path!r}: missing arrays {missing}")
        if "theta_codes" in arrays:
            arrays["theta_codes"] = _unpack_codes(arrays["theta_codes"])
        cal = cls(header, arrays)
        if expect is not None:
            unknown = set(expect) - {"fingerprint", "n_layers", "channels"}
            if unknown:
                raise ValueError(f"expect has unknown keys {sorted(unknown)}")
            cal.check_compatible(
                expect.get("fingerprint"),
                expect.get("n_layers", cal.n_layers),
                expect.get("channels", cal.channels),
            )
        return cal

    def __repr__(self) -> str:
        h = self._header
        return (
            f"Calibration(architecture={h['architecture']!r}, n_layers={h['n_layers']}, "
            f"train_len={h['train_len']}, clamp_top={h['clamp_top']}, "
            f"aggregate={h['aggregate']!r}, windows={h['num_windows']}, storage={h['storage']!r})"
        )


def _check_options(clamp_top, aggregate, slowest_state, storage, grid_step, fingerprint) -> None:
    if not (isinstance(clamp_top, (int, float)) and 0.0 <= float(clamp_top) <= 1.0):
        raise ValueError(f"clamp_top must be a number in [0, 1], got {clamp_top!r}")
    if aggregate not in _AGGREGATES:
        raise ValueError(f"aggregate must be one of {_AGGREGATES}, got {aggregate!r}")
    if slowest_state not in _SLOWEST_STATE:
        raise ValueError(f"slowest_state must be one of {_SLOWEST_STATE}, got {slowest_state!r}")
    if storage not in _STORAGES:
        raise ValueError(f"storage must be one of {_STORAGES}, got {storage!r}")
    if not (isinstance(grid_step, (int, float)) and 0.0 < float(grid_step) <= 1.0):
        raise ValueError(f"grid_step must be in (0, 1], got {grid_step!r}")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ValueError(f"fingerprint must be a str or None, got {type(fingerprint).__name__}")


def _check_A(A: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int], int]:
    """A as float64 arrays, the channel counts, and A's rank (1: Mamba2, 2: Mamba-1)."""
    out, channels, ranks = [], [], set()
    for i, a in enumerate(A):
        a = np.asarray(a, np.float64)
        if a.ndim not in (1, 2) or a.shape[0] == 0:
            raise ValueError(f"A[{i}] must be [channels] or [channels, d_state] with channels >= 1,"
                             f" got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"A[{i}] must be finite")
        out.append(a)
        channels.append(int(a.shape[0]))
        ranks.add(a.ndim)
    if len(ranks) != 1:
        raise ValueError("A mixes [channels] and [channels, d_state] layers")
    return out, channels, ranks.pop()


def _check_deltas(deltas: Sequence[np.ndarray], A: Sequence[np.ndarray], train_len: int) -> int:
    """Validates one batch of Δ (list over layers of [windows, train_len, channels]) against A;
    returns the number of windows."""
    windows = None
    for i, (d, a) in enumerate(zip(deltas, A, strict=True)):
        d = np.asarray(d)
        a = np.asarray(a)
        if d.ndim != 3:
            raise ValueError(
                f"deltas[{i}] must be [windows, train_len, channels], got shape {d.shape}"
            )
        if d.shape[1] != train_len:
            raise ValueError(
                f"deltas[{i}] has length {d.shape[1]} on axis 1 but train_len={train_len}"
            )
        if windows is None:
            windows = d.shape[0]
        if d.shape[0] != windows or d.shape[0] == 0:
            raise ValueError(
                f"deltas[{i}] has {d.shape[0]} windows, expected {windows} (and at least 1)"
            )
        if d.shape[2] == 0:
            raise ValueError(f"deltas[{i}] has no channels (shape {d.shape})")
        if not np.issubdtype(d.dtype, np.floating):
            raise ValueError(f"deltas[{i}] must be floating point, got dtype {d.dtype}")
        if not np.all(np.isfinite(d)) or np.any(d < 0):
            raise ValueError(f"deltas[{i}] must be finite and >= 0 (Δ after softplus)")
        if a.ndim not in (1, 2) or a.shape[0] != d.shape[2]:
            raise ValueError(
                f"A[{i}] must be [channels] or [channels, d_state] with channels="
                f"{d.shape[2]}, got shape {a.shape}"
            )
    return int(windows)


class CalibrationBuilder:
    """Builds a :class:`Calibration` from windows streamed in batches (SPEC §3.1).

    ``Calibration.from_deltas`` needs every window's Δ at once: ``windows × train_len ×
    channels`` floats per layer, 157 GB for a 48-layer, 4096-channel Mamba-1 with 100 windows of
    2,000 tokens. The builder takes the windows a batch at a time and keeps only what the rule
    aggregates: per channel the running sum (``mean``) or maximum (``max``) of the decay
    fraction, the decay, the clamp value and, for ``storage="grid"``, θ on the grid; so its
    memory is one batch plus ``channels × grid points`` per layer. ``storage="exact"`` keeps the
    sorted curves (that is what it stores), so ``"auto"`` picks it only for small inputs, as in
    :meth:`Calibration.from_deltas`, which is this builder fed in one batch; results are the same
    up to float summation order.

        builder = CalibrationBuilder(A, train_len=2000, num_windows=100)
        for batch in batches:            # list over layers of [w, train_len, channels]
            builder.add(batch)
        cal = builder.finish(fingerprint=..., model_info=...)
    """

    def __init__(self, A: Sequence[np.ndarray], *, train_len: int, num_windows: int,
                 clamp_top: float = 0.10, aggregate: str = "mean", slowest_state: str = "max",
                 storage: str = "auto", grid_step: float = 0.04):
        """Args: as :meth:`Calibration.from_deltas`, plus ``num_windows``, the number of windows
        that :meth:`add` will receive in all (it decides ``"auto"`` storage and the mean)."""
        self.train_len = _check_int("train_len", train_len, minimum=1)
        self.num_windows = _check_int("num_windows", num_windows, minimum=1)
        A = _as_layer_list("A", A, ndims=(2, 3))
        if len(A) == 0:
            raise ValueError("A is empty: need at least one layer")
        _check_options(clamp_top, aggregate, slowest_state, storage, grid_step, None)
        self._A, self.channels, self._a_rank = _check_A(A)
        self.clamp_top, self.aggregate = float(clamp_top), aggregate
        self.slowest_state, self.grid_step = slowest_state, float(grid_step)
        self.k = max(1, int(math.floor(self.clamp_top * self.train_len)))
        n_values = self.num_windows * sum(self.channels) * self.train_len
        if storage == "auto":
            few = self.num_windows < _FEW_WINDOWS and n_values <= _EXACT_BUDGET_FEW_WINDOWS
            storage = "exact" if n_values <= _EXACT_BUDGET or few else "grid"
        self.storage = storage
        self.grid_s = None
        if storage == "grid":
            # Per-row S* <= this bound (decay / q <= L and kc >= k); trimmed to max S* at the end.
            k, length = self.k, self.train_len
            bound = int(math.ceil((length + 2.5) * length / (k - 0.5))) + 1
            self.grid_s = _make_grid(length, bound, self.grid_step)
        self._seen = 0
        self._s_star = self.train_len + 1
        n = len(self.channels)
        self._ta: list[np.ndarray | None] = [None] * n
        self._decay: list[np.ndarray | None] = [None] * n
        self._q: list[np.ndarray | None] = [None] * n
        self._theta: list[np.ndarray | None] = [None] * n
        self._curves: list[list[np.ndarray]] = [[] for _ in range(n)]
        self._wdecay: list[list[np.ndarray]] = [[] for _ in range(n)]
        self._finished = False

    def _fold(self, acc: np.ndarray | None, x: np.ndarray) -> np.ndarray:
        """Running sum (mean) or max over windows (axis 0 of x)."""
        part = x.sum(axis=0) if self.aggregate == "mean" else x.max(axis=0)
        if acc is None:
            return part
        return acc + part if self.aggregate == "mean" else np.maximum(acc, part)

    def add(self, deltas: Sequence[np.ndarray]) -> None:
        """Adds a batch of windows: a list over layers of ``[w, train_len, channels]`` Δ (after
        softplus), the same windows in every layer."""
        if self._finished:
            raise ValueError("this CalibrationBuilder has already finished")
        deltas = _as_layer_list("deltas", deltas, ndims=(4,))
        if len(deltas) != len(self.channels):
            raise ValueError(f"got Δ for {len(deltas)} layers, the model has {len(self.channels)}")
        self._add_checked(deltas, _check_deltas(deltas, self._A, self.train_len))

    def _add_checked(self, deltas: list[np.ndarray], w: int) -> None:
        """`add` for a batch of `w` windows that `_check_deltas` has already validated."""
        if self._seen + w > self.num_windows:
            raise ValueError(f"{self._seen + w} windows added, more than num_windows="
                             f"{self.num_windows}")
        grid_s, length = self.grid_s, self.train_len
        for i, d in enumerate(deltas):
            d = np.asarray(d)
            c = d.shape[2]
            # channel chunks bound the float64 working set (all windows of a channel together)
            cstep = c if self.storage == "exact" else max(1, _CHUNK_ELEMS // (w * length))
            wdecay, q = np.empty((w, c)), np.empty((w, c))
            theta = None if self.storage == "exact" else np.empty((c, len(grid_s)))
            for c0 in range(0, c, cstep):
                cs = slice(c0, c0 + cstep)
                y, wdecay[:, cs] = _clamp_sort(d[:, :, cs], self.k)  # [w, c', l], [w, c']
                q[:, cs] = y[:, :, 0]
                if self.storage == "exact":
                    self._curves[i].append(y.astype(np.result_type(d.dtype, np.float32)))
                    self._wdecay[i].append(wdecay.copy())
                    continue
                cst = _const_from(y, wdecay[:, cs])  # [w, c']
                self._s_star = max(self._s_star, int(cst.max()))
                th = _fast_theta_rows(
                    y.reshape(-1, length), wdecay[:, cs].reshape(-1), grid_s
                ).reshape(w, -1, len(grid_s))
                th = np.where(grid_s >= cst[..., None], q[:, cs, None], th)  # exactly q from S*
                theta[cs] = self._fold(None, th)
                del y, th
            a = self._A[i]
            if a.ndim == 1:
                ta = np.exp(a[None, :] * wdecay)
            elif self.slowest_state == "max":
                ta = np.exp(a.max(axis=1)[None, :] * wdecay)
            else:
                ta = np.exp(a[None, :, :] * wdecay[:, :, None]).mean(axis=-1)
            self._ta[i] = self._fold(self._ta[i], ta)
            self._decay[i] = self._fold(self._decay[i], wdecay)
            self._q[i] = self._fold(self._q[i], q)
            if theta is not None:
                acc = self._theta[i]
                if acc is None:
                    self._theta[i] = theta
                elif self.aggregate == "mean":
                    acc += theta
                else:
                    np.maximum(acc, theta, out=acc)
        self._seen += w

    def finish(self, *, fingerprint: str | None = None,
               model_info: Mapping[str, Any] | None = None) -> Calibration:
        """The :class:`Calibration` of every window added (exactly ``num_windows`` of them)."""
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise ValueError(f"fingerprint must be a str or None, got {type(fingerprint).__name__}")
        if self._seen != self.num_windows:
            raise ValueError(f"{self._seen} windows added, expected num_windows="
                             f"{self.num_windows}")
        self._finished = True
        mean = self.aggregate == "mean"

        def agg(x: np.ndarray) -> np.ndarray:
            return x / self.num_windows if mean else x

        arrays: dict[str, np.ndarray] = {}
        asym = [agg(q).astype(np.float32) for q in self._q]
        arrays["decay_fraction"] = np.concatenate([agg(t) for t in self._ta]).astype(np.float32)
        arrays["decay"] = np.concatenate([agg(d) for d in self._decay]).astype(np.float32)
        arrays["theta_asym"] = np.concatenate(asym)
        grid_desc: dict[str, Any] | None = None
        if self.storage == "exact":
            for i in range(len(self.channels)):
                arrays[f"curves_{i}"] = np.concatenate(self._curves[i], axis=0)
                arrays[f"window_decay_{i}"] = np.concatenate(self._wdecay[i], axis=0)
        else:
            grid_s = self.grid_s
            keep = int(np.searchsorted(grid_s, self._s_star, side="left")) + 1  # first >= S*
            codes = np.empty((keep, sum(self.channels)), np.uint16)
            off = 0
            for i, c in enumerate(self.channels):
                theta = agg(self._theta[i][:, :keep])
                codes[:, off : off + c] = _encode(theta.T, asym[i].astype(np.float64)[None, :])
                off += c
            grid_s = grid_s[:keep]
            arrays["grid_s"] = grid_s
            arrays["theta_codes"] = codes
            grid_desc = {
                "variable": "log(S - train_len)",
                "step": self.grid_step,
                "n_points": int(len(grid_s)),
                "s_min": int(grid_s[0]),
                "s_max": int(grid_s[-1]),
                "interp": "linear",
                "code": "uint16 round(-log(theta / theta_asym) / code_step), 65535 = zero",
                "code_step": _CODE_STEP,
            }
        info = dict(model_info) if model_info is not None else {}
        architecture = info.pop("architecture", "mamba2" if self._a_rank == 1 else "mamba1")
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": _library_version(),
            "fingerprint": fingerprint,
            "architecture": architecture,
            "n_layers": len(self.channels),
            "channels": list(self.channels),
            "train_len": self.train_len,
            "clamp_top": self.clamp_top,
            "clamp_k": self.k,
            "aggregate": self.aggregate,
            "slowest_state": self.slowest_state if self._a_rank == 2 else None,
            "num_windows": self.num_windows,
            "storage": self.storage,
            "grid": grid_desc,
            "model_info": info,
        }
        try:
            json.dumps(header)
        except TypeError as e:
            raise ValueError(f"model_info must be JSON-serialisable: {e}") from None
        return Calibration(header, arrays)


def _pack_codes(codes: np.ndarray) -> np.ndarray:
    """``[n, C]`` uint16 -> ``[2, n, C]`` uint8 byte planes of the S-differences (mod 2**16)."""
    diff = np.diff(codes, axis=0, prepend=np.zeros((1, codes.shape[1]), np.uint16))  # wraps
    planes = diff.astype("<u2").view(np.uint8).reshape(codes.shape + (2,))
    return np.ascontiguousarray(planes.transpose(2, 0, 1))


def _unpack_codes(planes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_codes`."""
    if planes.dtype != np.uint8 or planes.ndim != 3 or planes.shape[0] != 2:
        raise ValueError(f"theta_codes must be [2, n, C] uint8 planes, got {planes.shape}")
    diff = np.ascontiguousarray(planes.transpose(1, 2, 0)).view("<u2")[..., 0]
    return np.cumsum(diff, axis=0, dtype=np.uint16)


def _as_layer_list(name: str, value: Any, *, ndims: tuple[int, ...]) -> list[Any]:
    """A list over layers; a stacked array (layers on axis 0) is split along axis 0."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "shape"):
        arr = np.asarray(value)
        if arr.ndim not in ndims:
            raise ValueError(
                f"{name} must be a list over layers (or an array stacked on axis 0 with ndim in "
                f"{ndims}), got an array of shape {arr.shape}"
            )
        return list(arr)
    raise ValueError(f"{name} must be a list over layers, got {type(value).__name__}")


def _short(x: Sequence[int]) -> str:
    x = [int(v) for v in x]
    return str(x) if len(x) <= 6 else f"[{x[0]}, {x[1]}, ... x{len(x)}]"


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)
