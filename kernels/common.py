"""Shared pieces of the scan kernels: the LongMamba Δ filter, padding, tolerances.

Notation used across `kernels/`: b batch, l length, e Mamba-1 channels (d_inner), n state size,
h Mamba2 heads, p head dim, g groups (B/C shared by h/g heads), c chunks, s chunk size.

The LongMamba filter (docs/design.md, "LongMamba filtering") is given to every implementation as two
per-channel arrays and applied inside the scan:

    Δ_eff = where(is_global & (Δ <= threshold), 0, Δ)

so a filtered token neither decays nor enters the state of a global channel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

# Per-dtype tolerances for ‖out − ref‖ / ‖ref‖ in kernel tests (inputs of that dtype; fp32 math).
RTOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}

IMPLEMENTATIONS = ("reference", "associative", "pallas")

HIGHEST = jax.lax.Precision.HIGHEST

# The Pallas kernels keep their log-decays (Δ A and its sums) in base 2: A is pre-scaled by
# log2(e) outside the kernel, so every decay is one exp2. Pallas lowers jnp.exp to libdevice's
# expf (a range reduction around one ex2.approx) and jnp.exp2 to exp2f, whose results matched a
# bare inline ex2.approx bit for bit on the H100. The scans evaluate a decay for every element
# they touch (docs/kernels.md, "Decays as exp2"). exp2f still wraps the ex2.approx in a
# subnormal range check (an FSETP and two FMULs in the SASS), which the selective scan, issue
# bound, skips by default with an inline `ex2.approx.ftz`.
LOG2E = 1.4426950408889634


def filter_threshold(dt_global, dt_threshold, channels: int):
    """Folds (is_global [c] bool, threshold [c]) into one fp32 array [c]: -inf on local channels.

    Δ >= 0 after softplus, so `Δ <= -inf` never holds and local channels pass unchanged. Returns
    None when no filter is given. Both arrays or neither must be given.
    """
    if dt_global is None and dt_threshold is None:
        return None
    if dt_global is None or dt_threshold is None:
        raise ValueError("the Δ filter needs both dt_global and dt_threshold (or neither)")
    dt_global = jnp.asarray(dt_global)
    dt_threshold = jnp.asarray(dt_threshold, jnp.float32)
    if dt_global.shape != (channels,) or dt_threshold.shape != (channels,):
        raise ValueError(
            f"Δ filter arrays must have shape ({channels},); got dt_global {dt_global.shape}, "
            f"dt_threshold {dt_threshold.shape}"
        )
    return jnp.where(dt_global.astype(bool), dt_threshold, -jnp.inf)


def document_index(segment_ids):
    """segment_ids [b, l] (any ints) -> int32 [b, l]: the index of each position's document in
    its row, counting from 0. A document is a run of equal ids: position t starts a new one when
    segment_ids[t] != segment_ids[t − 1]; the first document continues the initial state."""
    seg = jnp.asarray(segment_ids)
    if seg.ndim != 2 or not jnp.issubdtype(seg.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be int [b, l], got {seg.dtype} {seg.shape}")
    change = (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), jnp.cumsum(change, axis=1)], axis=1)


def document_starts(segment_ids):
    """bool [b, l]: where a new document starts (its state starts from zero), position 0 never."""
    idx = document_index(segment_ids)
    return jnp.concatenate([jnp.zeros_like(idx[:, :1], bool), idx[:, 1:] != idx[:, :-1]], 1)


def with_optional_ref(kernel, index: int, present: bool):
    """A Pallas kernel body that takes a ref at position `index` which the call passes only
    when `present`; without it, None stands in, so the call (and the compiled kernel) is the one
    without that input."""
    if present:
        return kernel
    return lambda *refs: kernel(*refs[:index], None, *refs[index:])


def chunk_documents(doc_ref, bi, t0, chunk, valid=None):
    """Documents of the chunk at t0 (`doc_ref` [b, l'] int32, nondecreasing along a row): d [s],
    carried [s] (d_i is the document running before the chunk, whose state enters), tail [s]
    (d_i is the chunk's last document, the one whose state leaves) and through (a scalar: no
    document starts in the chunk, so the entering state passes it). Position 0 belongs to the
    document of the initial state. A chunk that is not `valid` passes the state unchanged."""
    d = doc_ref[bi, pl.ds(t0, chunk)]  # [s]
    before = doc_ref[bi, jnp.maximum(t0 - 1, 0)]
    last = doc_ref[bi, t0 + chunk - 1]
    through = last == before
    if valid is not None:
        through = through | jnp.logical_not(valid)
    return d, d == before, d == last, through


def reset_offsets(doc, length: int):
    """The per-token log-offset of packed documents, fp32 [b, length]: −∞ at each document's
    first token (position 0 excepted), 0 elsewhere and on padding past doc's length. A scan
    computes its decay as exp2(Δ a + offset): 0 at a start, so the state restarts there."""
    start = doc[:, 1:] != doc[:, :-1]  # [b, l − 1]
    r = jnp.where(start, -jnp.inf, 0.0).astype(jnp.float32)
    return pad_axis(jnp.concatenate([jnp.zeros_like(r[:, :1]), r], axis=1), 1, length)


def span_offsets(doc, starts, ends):
    """−∞ (fp32 [b, k]) where a document starts in positions [starts[k], ends[k]) of a row, else
    0: the log-offset of the decay over that span (`doc` [b, l] the document index; ends may run
    past l). Position 0 never counts as a start."""
    before = jnp.concatenate([jnp.zeros_like(doc[:, :1]), doc], axis=1)  # before[t] = doc[t − 1]
    last = before.shape[1] - 1
    at = lambda pos: before[:, np.minimum(np.asarray(pos), last)]
    return jnp.where(at(ends) != at(starts), -jnp.inf, 0.0).astype(jnp.float32)


def check_segment_ids(segment_ids, b: int, length: int):
    """segment_ids must be int [b, l] matching the inputs (None passes)."""
    if segment_ids is None:
        return None
    seg = jnp.asarray(segment_ids)
    if seg.shape != (b, length) or not jnp.issubdtype(seg.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be int [{b}, {length}] like the inputs' [b, l]; got "
                         f"{seg.dtype} {seg.shape}")
    return seg


def apply_filter(dt, threshold):
    """Δ_eff = where(Δ <= threshold, 0, Δ), threshold broadcast over the last axis (channels)."""
    if threshold is None:
        return dt
    return jnp.where(dt <= threshold, jnp.zeros_like(dt), dt)


def delta_from_projection(dt, dt_bias=None, softplus: bool = False):
    """Δ from the raw Δ projection, fp32: dt (+ dt_bias per channel) (then softplus). The Pallas
    selective scan computes this in place from the raw projection (mamba_ssm's `delta_bias`,
    `delta_softplus`); the other implementations call this first."""
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    return jax.nn.softplus(dt) if softplus else dt


def gate_input(z, channels: int):
    """The gate's last `channels` columns: z may be wider, so a projection's [x | z] output can
    be passed whole (the fused kernel reads the columns in place; no copy of the slice)."""
    if z.ndim != 3 or z.shape[-1] < channels:
        raise ValueError(f"gate z must be [b, l, >= {channels}] (its last {channels} columns are "
                         f"the gate); got shape {z.shape}")
    return z[..., z.shape[-1] - channels:]


def apply_gate(y, z):
    """y · silu(z) in fp32 (mamba_ssm's selective_scan_fn with z)."""
    z = z.astype(jnp.float32)
    return y * (z * jax.nn.sigmoid(z))


def pad_axis(a, axis: int, size: int, value=0):
    """Pads `a` at the end of `axis` to `size` with `value` (zeros); `a` itself if it is that
    long already."""
    pad = size - a.shape[axis]
    if pad == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return jnp.pad(a, widths, constant_values=value)


def pad_time(a, multiple: int, axis: int = 1, value=0):
    """Pads `a` along `axis` up to a multiple of `multiple` with `value` (zeros). Padding with
    Δ = 0 leaves the state untouched, so final states stay exact."""
    return pad_axis(a, axis, -(-a.shape[axis] // multiple) * multiple, value)


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown scan implementation {implementation!r}; choose one of {IMPLEMENTATIONS}"
        )


def check_selective_scan_shapes(where: str, x, dt, A, B, C):
    """One error, naming `where` and every shape, unless x/Δ [b, l, e], A [e, n] and B/C
    [b, l, n] agree (the selective-scan kernels' wrappers)."""
    b, length, e = x.shape
    n = A.shape[-1]
    if dt.shape != x.shape or A.shape != (e, n) or B.shape != (b, length, n) or (
            C.shape != B.shape):
        raise ValueError(
            f"{where} shapes disagree: x {x.shape}, dt {dt.shape}, A {A.shape}, "
            f"B {B.shape}, C {C.shape}")
