"""`CalibrationBuilder`: a calibration from windows of Δ streamed in batches, keeping only
what the rule aggregates per channel (docs/design.md, "LongMamba calibration")."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from longmamba_jax.calibration.artifact import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Calibration,
    library_version,
)
from longmamba_jax.calibration.grid import CODE_STEP, encode, make_grid
from longmamba_jax.calibration.rule import CHUNK_ELEMS, clamp_sort, const_from, fast_theta_rows
from longmamba_jax.calibration.validate import (
    as_layer_list,
    check_A,
    check_deltas,
    check_int,
    check_options,
)

_EXACT_BUDGET = 1 << 22  # values (windows * channels * train_len) kept for storage="exact"
# With few windows the exact θ(S) is a staircase that the grid cannot follow within 1% (measured:
# 2.1% worst with 1 window, 0.84% with 4), so few-window calibrations stay exact up to a larger
# size; many-window ones are smooth and the grid is well within 1% (0.17% with 100 windows).
_FEW_WINDOWS = 8
_EXACT_BUDGET_FEW_WINDOWS = 1 << 25


class CalibrationBuilder:
    """Builds a :class:`Calibration` from windows streamed in batches (docs/design.md,
    "LongMamba calibration").

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
        self.train_len = check_int("train_len", train_len, minimum=1)
        self.num_windows = check_int("num_windows", num_windows, minimum=1)
        A = as_layer_list("A", A, ndims=(2, 3))
        if len(A) == 0:
            raise ValueError("A is empty: need at least one layer")
        check_options(clamp_top, aggregate, slowest_state, storage, grid_step, None)
        self._A, self.channels, self._a_rank = check_A(A)
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
            self.grid_s = make_grid(length, bound, self.grid_step)
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
        deltas = as_layer_list("deltas", deltas, ndims=(4,))
        if len(deltas) != len(self.channels):
            raise ValueError(f"got Δ for {len(deltas)} layers, the model has {len(self.channels)}")
        self._add_checked(deltas, check_deltas(deltas, self._A, self.train_len))

    def _add_checked(self, deltas: list[np.ndarray], w: int) -> None:
        """`add` for a batch of `w` windows that `check_deltas` has already validated."""
        if self._seen + w > self.num_windows:
            raise ValueError(f"{self._seen + w} windows added, more than num_windows="
                             f"{self.num_windows}")
        grid_s, length = self.grid_s, self.train_len
        for i, d in enumerate(deltas):
            d = np.asarray(d)
            c = d.shape[2]
            # channel chunks bound the float64 working set (all windows of a channel together)
            cstep = c if self.storage == "exact" else max(1, CHUNK_ELEMS // (w * length))
            wdecay, q = np.empty((w, c)), np.empty((w, c))
            theta = None if self.storage == "exact" else np.empty((c, len(grid_s)))
            for c0 in range(0, c, cstep):
                cs = slice(c0, c0 + cstep)
                y, wdecay[:, cs] = clamp_sort(d[:, :, cs], self.k)  # [w, c', l], [w, c']
                q[:, cs] = y[:, :, 0]
                if self.storage == "exact":
                    self._curves[i].append(y.astype(np.result_type(d.dtype, np.float32)))
                    self._wdecay[i].append(wdecay.copy())
                    continue
                cst = const_from(y, wdecay[:, cs])  # [w, c']
                self._s_star = max(self._s_star, int(cst.max()))
                th = fast_theta_rows(
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
               model_info: Mapping[str, Any] | None = None,
               weights_digest: str | None = None) -> Calibration:
        """The :class:`Calibration` of every window added (exactly ``num_windows`` of them).

        ``weights_digest`` (``record.weights_digest`` of the model) is stored and compared by
        :meth:`Calibration.check_compatible`."""
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise ValueError(f"fingerprint must be a str or None, got {type(fingerprint).__name__}")
        if weights_digest is not None and not isinstance(weights_digest, str):
            raise ValueError(f"weights_digest must be a str or None, got "
                             f"{type(weights_digest).__name__}")
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
                codes[:, off : off + c] = encode(theta.T, asym[i].astype(np.float64)[None, :])
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
                "code_step": CODE_STEP,
            }
        info = dict(model_info) if model_info is not None else {}
        architecture = info.pop("architecture", "mamba2" if self._a_rank == 1 else "mamba1")
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": library_version(),
            "fingerprint": fingerprint,
            "weights_digest": weights_digest,
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

