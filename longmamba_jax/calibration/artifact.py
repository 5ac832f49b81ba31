"""`Calibration`: a LongMamba calibration of one model, and its versioned `.npz` file.

Per layer and channel it holds the window-aggregated decay fraction ``tA_prod`` (which channels
are global), the decay ``Σ_t Δ`` and θ(S) for any length S > train_len, stored one of two ways:

* ``"exact"``: the sorted clamped Δ curves ``[windows, channels, L]`` and per-window decays;
  `thresholds(S)` evaluates the rule (`rule.py`) exactly, in float64, for any S.
* ``"grid"``: θ on a grid of lengths uniform in ``log(S - L)`` (`grid.py`), interpolated in
  ``log(S - L)``; past the grid θ is exactly the aggregated clamp value.

The file is an ``.npz`` with a JSON header (format version, library version, model
fingerprint, digest of the weights, architecture, layer and channel counts, train_len,
clamp_top, aggregate, slowest_state, number of windows, grid description), written atomically.
docs/design.md, "LongMamba calibration", gives the rule, the storage and the measured grid
error; docs/reliability.md, "Calibrations", what `load` checks.
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

from longmamba_jax.calibration.grid import decode, pack_codes, unpack_codes
from longmamba_jax.calibration.rule import (
    aggregate_windows,
    const_from,
    exact_cut_rows,
    exact_theta_rows,
)
from longmamba_jax.calibration.validate import (
    CalibrationError,
    check_file_contents,
    check_int,
    short,
)

__all__ = ["Calibration", "CalibrationError", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "longmamba-jax-calibration"
FORMAT_VERSION = 1


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("longmamba-jax")
    except Exception:  # not installed (e.g. a source checkout on sys.path)
        return "unknown"



class Calibration:
    """Per-layer, per-channel LongMamba calibration; see the module docstring.

    Build with :meth:`from_deltas` (or the model-level ``calibrate``), persist with :meth:`save`
    and :meth:`load`. Per-layer lists follow the model's layer order.
    """

    def __init__(self, header: dict[str, Any], arrays: dict[str, np.ndarray]):
        """Internal: use :meth:`from_deltas` or :meth:`load`."""
        self._header = header
        self._arrays = arrays
        channels = list(header["channels"])
        self._bounds = np.concatenate([[0], np.cumsum(channels)]).astype(np.int64)
        self._cache: dict[int, np.ndarray] = {}  # θ_S, flat over layers, per S
        self._alpha_cache: dict[int, np.ndarray] = {}  # α_S, the same
        if header["storage"] == "exact":
            self._curves = [arrays[f"curves_{i}"].astype(np.float64) for i in range(len(channels))]
            self._wdecay = [arrays[f"window_decay_{i}"] for i in range(len(channels))]
            self._const = [
                const_from(y, d) for y, d in zip(self._curves, self._wdecay, strict=True)
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
        weights_digest: str | None = None,
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
          weights_digest: ``record.weights_digest`` of the model, stored and compared by
            :meth:`check_compatible` (and by ``LongMamba``).

        Returns:
          A :class:`Calibration`.
        """
        from longmamba_jax.calibration.builder import CalibrationBuilder
        from longmamba_jax.calibration.validate import as_layer_list, check_deltas, check_options

        train_len = check_int("train_len", train_len, minimum=1)
        deltas = as_layer_list("deltas", deltas, ndims=(4,))
        A = as_layer_list("A", A, ndims=(2, 3))
        if len(deltas) == 0:
            raise ValueError("deltas is empty: need at least one layer")
        if len(A) != len(deltas):
            raise ValueError(f"len(A)={len(A)} does not match len(deltas)={len(deltas)}")
        check_options(clamp_top, aggregate, slowest_state, storage, grid_step, fingerprint)
        windows = check_deltas(deltas, A, train_len)
        builder = CalibrationBuilder(
            A, train_len=train_len, num_windows=windows, clamp_top=clamp_top,
            aggregate=aggregate, slowest_state=slowest_state, storage=storage,
            grid_step=grid_step,
        )
        builder._add_checked(deltas, windows)  # validated above: one pass over the data
        return builder.finish(fingerprint=fingerprint, model_info=model_info,
                              weights_digest=weights_digest)

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
    def weights_digest(self) -> str | None:
        """Digest of the weights it was measured on (None in files written before digests)."""
        return self._header.get("weights_digest")

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

    @property
    def clamp_values(self) -> list[np.ndarray]:
        """List over layers of ``[channels]`` float32: the aggregated clamp value q (the
        k-th largest Δ of a window), which θ_S reaches for long S."""
        return self._split(self._arrays["theta_asym"].astype(np.float32))

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
        s = check_int("seq_len", seq_len, minimum=1)
        if s <= self.train_len:
            raise ValueError(
                f"seq_len={s} must exceed train_len={self.train_len}: LongMamba thresholds are "
                "only defined past the training length"
            )
        def solve():
            if self.storage == "exact":
                return np.concatenate([self._exact_layer(i, s) for i in range(self.n_layers)])
            return self._grid_thresholds(s)

        return self._per_length(self._cache, s, solve)

    def keep_fractions(self, seq_len: int) -> list[np.ndarray]:
        """α for a sequence of ``seq_len`` tokens: per channel the share of the S tokens the
        calibration rule keeps ((k + 1) / S at θ_S's cut), aggregated over windows like θ; what
        the "alpha" and "offline" selection rules read.

        Returns:
          List over layers of ``[channels]`` float32 α_S in (0, 1].
        """
        s = check_int("seq_len", seq_len, minimum=1)
        if s <= self.train_len:
            raise ValueError(f"seq_len={s} must exceed train_len={self.train_len}")
        if self.storage != "exact":
            raise ValueError(
                "this calibration stores θ on a grid, without the kept fractions α that the "
                "'alpha' and 'offline' rules need; calibrate again with storage='exact'")
        def solve():  # a solve per channel and window
            out = []
            for y, wd in zip(self._curves, self._wdecay, strict=True):
                w, c, length = y.shape
                _, alpha = exact_cut_rows(y.reshape(w * c, length), wd.reshape(-1), s)
                out.append(aggregate_windows(alpha.reshape(w, c), self._header["aggregate"]))
            return np.concatenate(out)

        return self._per_length(self._alpha_cache, s, solve)

    def _per_length(self, cache: dict, s: int, solve) -> list[np.ndarray]:
        """Per layer, the float32 values `solve()` gives flat over layers for length s, solved
        once per length (the last 64 lengths are kept)."""
        if s not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[s] = solve().astype(np.float32)
        return self._split(cache[s])

    def _exact_layer(self, i: int, s: int) -> np.ndarray:
        y, wd, cst = self._curves[i], self._wdecay[i], self._const[i]
        w, c, length = y.shape
        theta = y[:, :, 0].copy()  # the asymptote q, exact for s >= S*
        need = s < cst
        if need.any():
            theta[need] = exact_theta_rows(y[need], wd[need], s)
        return aggregate_windows(theta, self._header["aggregate"])

    def _grid_thresholds(self, s: int) -> np.ndarray:
        grid_s = self._arrays["grid_s"]
        asym = self._arrays["theta_asym"].astype(np.float64)
        codes = self._arrays["theta_codes"]
        if s >= grid_s[-1]:
            return asym
        j = int(np.searchsorted(grid_s, s, side="right")) - 1  # grid_s[j] <= s < grid_s[j+1]
        lo = decode(codes[j], asym)
        if grid_s[j] == s:
            return lo
        hi = decode(codes[j + 1], asym)
        length = self.train_len
        z0, z1 = math.log(grid_s[j] - length), math.log(grid_s[j + 1] - length)
        wgt = (math.log(s - length) - z0) / (z1 - z0)
        return (1.0 - wgt) * lo + wgt * hi

    # -------------------------------------------------------------------- compatibility
    def check_compatible(self, fingerprint: str | None, n_layers: int, channels: Sequence[int],
                         weights_digest: str | None = None):
        """Raises ValueError unless this calibration was made for the described model.

        Args:
          fingerprint: the model's fingerprint (compared when both sides have one).
          n_layers: the model's layer count.
          channels: per-layer channel counts (E for Mamba-1, heads for Mamba2).
          weights_digest: `record.weights_digest` of the model's weights (compared when both
            sides have one).
        """
        problems = []
        mine = self._header["fingerprint"]
        if fingerprint is not None and mine is not None and fingerprint != mine:
            problems.append(f"fingerprint {mine!r} != model's {fingerprint!r}")
        digest = self.weights_digest
        if weights_digest is not None and digest is not None and weights_digest != digest:
            problems.append(f"weights digest {digest} != model's {weights_digest} (measured on "
                            "other weights)")
        if int(n_layers) != self.n_layers:
            problems.append(f"n_layers {self.n_layers} != model's {int(n_layers)}")
        if [int(c) for c in channels] != self.channels:
            problems.append(f"channels {short(self.channels)} != model's {short(channels)}")
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
            arrays["theta_codes"] = pack_codes(arrays["theta_codes"])
        buf = io.BytesIO()
        np.savez_compressed(buf, header=np.asarray(json.dumps(self._header)), **arrays)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".calibration-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a calibration is not
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
          expect: optional ``{"fingerprint": str, "n_layers": int, "channels": [int, ...],
            "weights_digest": str}`` (any subset); a mismatch raises ValueError naming it.

        Returns:
          The :class:`Calibration`.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"calibration file not found: {path!r}")
        try:
            with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # f: closed
                arrays = {name: z[name] for name in z.files}  # even when np.load fails
        except Exception as e:  # noqa: BLE001 - zip, zlib and npy errors come in many types
            raise CalibrationError(f"{path}: not a calibration artifact ({e})") from None
        header = arrays.pop("header", None)
        if header is None or header.dtype.kind != "U" or header.ndim != 0:
            raise CalibrationError(f"{path}: not a calibration artifact (no text header)")
        try:
            header = json.loads(str(header))
        except (ValueError, RecursionError) as e:
            raise CalibrationError(f"{path}: the header is not valid JSON ({e})") from None
        check_file_contents(path, header, arrays, FORMAT_NAME, FORMAT_VERSION)
        if "theta_codes" in arrays:
            arrays["theta_codes"] = unpack_codes(arrays["theta_codes"])
        cal = cls(header, arrays)
        if expect is not None:
            unknown = set(expect) - {"fingerprint", "n_layers", "channels", "weights_digest"}
            if unknown:
                raise ValueError(f"expect has unknown keys {sorted(unknown)}")
            try:
                cal.check_compatible(
                    expect.get("fingerprint"),
                    expect.get("n_layers", cal.n_layers),
                    expect.get("channels", cal.channels),
                    expect.get("weights_digest"),
                )
            except ValueError as e:
                raise CalibrationError(f"{path}: {e}") from None
        return cal

    def __repr__(self) -> str:
        h = self._header
        return (
            f"Calibration(architecture={h['architecture']!r}, n_layers={h['n_layers']}, "
            f"train_len={h['train_len']}, clamp_top={h['clamp_top']}, "
            f"aggregate={h['aggregate']!r}, windows={h['num_windows']}, storage={h['storage']!r})"
        )

