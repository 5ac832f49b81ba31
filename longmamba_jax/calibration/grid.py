"""How θ(S) is stored for large calibrations: a grid of lengths uniform in ``log(S - L)`` plus
anchor lengths, θ coded as uint16 steps of ``-log(θ / θ_asym)``, delta-coded along S and split
into byte planes (which deflate well in the ``.npz``)."""

from __future__ import annotations

import math

import numpy as np

CODE_STEP = 1e-3  # quantisation step of -log(θ / θ_asym): relative rounding <= 5e-4
ZERO_CODE = np.iinfo(np.uint16).max  # code for θ == 0
MAX_CODE = ZERO_CODE - 1
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


def make_grid(train_len: int, s_max: int, step: float) -> np.ndarray:
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


def encode(theta: np.ndarray, asym: np.ndarray) -> np.ndarray:
    """θ -> uint16 codes of -log(θ / θ_asym) (``ZERO_CODE`` for θ == 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = -np.log(theta / asym) / CODE_STEP
    codes = np.clip(np.round(np.nan_to_num(z, nan=0.0, posinf=MAX_CODE)), 0, MAX_CODE)
    codes = codes.astype(np.uint16)
    return np.where((theta > 0) & (asym > 0), codes, np.uint16(ZERO_CODE)).astype(np.uint16)


def decode(codes: np.ndarray, asym: np.ndarray) -> np.ndarray:
    theta = asym * np.exp(-codes.astype(np.float64) * CODE_STEP)
    return np.where(codes == ZERO_CODE, 0.0, theta)



def pack_codes(codes: np.ndarray) -> np.ndarray:
    """``[n, C]`` uint16 -> ``[2, n, C]`` uint8 byte planes of the S-differences (mod 2**16)."""
    diff = np.diff(codes, axis=0, prepend=np.zeros((1, codes.shape[1]), np.uint16))  # wraps
    planes = diff.astype("<u2").view(np.uint8).reshape(codes.shape + (2,))
    return np.ascontiguousarray(planes.transpose(2, 0, 1))


def unpack_codes(planes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_codes`."""
    if planes.dtype != np.uint8 or planes.ndim != 3 or planes.shape[0] != 2:
        raise ValueError(f"theta_codes must be [2, n, C] uint8 planes, got {planes.shape}")
    diff = np.ascontiguousarray(planes.transpose(1, 2, 0)).view("<u2")[..., 0]
    return np.cumsum(diff, axis=0, dtype=np.uint16)

