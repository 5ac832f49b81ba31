"""One shared suite for the scan kernels: implementation × named shape × dtype.

Every implementation is compared with the sequential fp32 reference (output AND final state, by
‖out − ref‖ / ‖ref‖ against `RTOL[dtype]`), NaN-free, with the LongMamba filter and an initial
state on and off; the reference and the Pallas kernel are also checked against an independent
float64 numpy loop. "pallas" runs through the Pallas interpreter on CPU; "pallas-gpu" is the same
kernel compiled (marked `gpu`; `evals/device/kernel_tests.sh` runs it on a GPU).
Small Pallas block sizes are used so that short sequences still span several chunks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longmamba_kernels.common import RTOL, filter_threshold
from longmamba_kernels.selective_scan import default_config, selective_scan, selective_scan_pallas
from longmamba_kernels.selective_scan.associative import selective_scan_associative
from longmamba_kernels.selective_scan.pallas_mosaic import SelectiveScanMosaicConfig, mosaic_blocks
from longmamba_kernels.selective_scan.pallas_triton import (
    SelectiveScanPallasConfig,
    lane_channels,
    lane_segments,
)
from longmamba_kernels.selective_scan.reference import selective_scan_reference
from longmamba_kernels.ssd import ssd
from longmamba_kernels.ssd.pallas_triton import SSDPallasConfig, ssd_pallas, ssd_segments

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="compiled Pallas kernels need a CUDA GPU")

SSD_TEST_CONFIG = SSDPallasConfig(chunk=16, block_p=16)
# Three time segments (a states pass, then the scan from the combined states), even at T=1.
SS_TEST_CONFIG = SelectiveScanPallasConfig(block_e=8, block_t=2, segments=3)

# The Mosaic GPU selective scan with small blocks: 16 tokens a TMA block in groups of 4, two
# blocks in flight, so T=63 walks 4 blocks through both buffers (the last one padded).
SS_MOSAIC_TEST_CONFIG = SelectiveScanMosaicConfig(block_t=16, unroll=4, stages=2)

IMPLS = [
    "associative",
    "pallas",
    pytest.param("pallas-gpu", marks=[pytest.mark.gpu, gpu_only]),
]
# the selective scan has a second kernel: "mosaic" runs it in the Mosaic GPU interpreter
SS_IMPLS = [
    *IMPLS,
    "mosaic",
    pytest.param("mosaic-gpu", marks=[pytest.mark.gpu, gpu_only]),
]
DTYPES = [jnp.float32, jnp.bfloat16]


@dataclasses.dataclass(frozen=True)
class SSDShape:
    b: int
    l: int
    h: int
    p: int
    g: int
    n: int


@dataclasses.dataclass(frozen=True)
class SSShape:
    b: int
    l: int
    e: int
    n: int


SSD_SHAPES = {
    "T1": SSDShape(b=1, l=1, h=2, p=16, g=1, n=16),
    "T63_groups2_p8_n16": SSDShape(b=2, l=63, h=4, p=8, g=2, n=16),
    "T40_p16_n8": SSDShape(b=1, l=40, h=4, p=16, g=1, n=8),  # 40 % 16 != 0; p != n
}
SS_SHAPES = {
    "T1": SSShape(b=1, l=1, e=8, n=16),
    "T63": SSShape(b=2, l=63, e=20, n=12),  # e not a multiple of the block; n not a power of 2
    "T34": SSShape(b=1, l=34, e=16, n=4),
}


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def assert_close(out, ref, dtype, what):
    out = np.asarray(out)
    assert np.all(np.isfinite(out)), f"{what}: NaN or inf in output"
    err = rel_err(out, ref)
    tol = RTOL[jnp.dtype(dtype)]
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


# ----------------------------------------------------------------------------------- inputs
def ssd_inputs(shape: SSDShape, dtype, seed=0, with_filter=True, with_init=True):
    b, l, h, p, g, n = dataclasses.astuple(shape)
    k = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(k[0], (b, l, h, p)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, l, h)) - 1.0)  # fp32 Δ
    A = -jnp.exp(jax.random.uniform(k[2], (h,), minval=-1.0, maxval=1.5))
    B = jax.random.normal(k[3], (b, l, g, n)).astype(dtype)
    C = jax.random.normal(k[4], (b, l, g, n)).astype(dtype)
    D = jax.random.normal(k[5], (h,))
    s0 = jax.random.normal(k[6], (b, h, p, n)) if with_init else None
    # Even heads global with a threshold near Δ's median (so about half the tokens are dropped).
    filt = dict(dt_global=jnp.arange(h) % 2 == 0, dt_threshold=jnp.full((h,), 0.3))
    return (x, dt, A, B, C, D), s0, (filt if with_filter else {})


def ss_inputs(shape: SSShape, dtype, seed=0, with_filter=True, with_init=True):
    b, l, e, n = dataclasses.astuple(shape)
    k = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(k[0], (b, l, e)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, l, e)) - 1.0)
    A = -jnp.exp(jax.random.uniform(k[2], (e, n), minval=-1.0, maxval=1.5))
    B = jax.random.normal(k[3], (b, l, n)).astype(dtype)
    C = jax.random.normal(k[4], (b, l, n)).astype(dtype)
    D = jax.random.normal(k[5], (e,))
    h0 = jax.random.normal(k[6], (b, e, n)) if with_init else None
    filt = dict(dt_global=jnp.arange(e) % 2 == 0, dt_threshold=jnp.full((e,), 0.3))
    return (x, dt, A, B, C, D), h0, (filt if with_filter else {})


# ------------------------------------------------------------------------ implementations
@functools.partial(jax.jit, static_argnames="impl")
def _ssd_jnp(args, s0, filt, impl):
    return ssd(*args, initial_state=s0, implementation=impl, chunk_size=16, **filt)


@functools.partial(jax.jit, static_argnames="impl")
def _ss_jnp(args, h0, filt, impl):
    return selective_scan(*args, initial_state=h0, implementation=impl, **filt)


def run_ssd(impl, args, s0, filt):
    if impl == "reference" or impl == "associative":
        return _ssd_jnp(args, s0, filt, impl=impl)
    thr = filter_threshold(filt.get("dt_global"), filt.get("dt_threshold"), args[0].shape[2])
    return ssd_pallas(
        *args, initial_state=s0, threshold=thr, interpret=(impl == "pallas"),
        config=SSD_TEST_CONFIG,
    )


def run_ss(impl, args, h0, filt):
    if impl == "reference" or impl == "associative":
        return _ss_jnp(args, h0, filt, impl=impl)
    thr = filter_threshold(filt.get("dt_global"), filt.get("dt_threshold"), args[0].shape[-1])
    config = {"pallas": SS_TEST_CONFIG, "pallas-gpu": SS_TEST_CONFIG,
              "mosaic": SS_MOSAIC_TEST_CONFIG, "mosaic-gpu": SelectiveScanMosaicConfig()}[impl]
    return selective_scan_pallas(
        *args, initial_state=h0, threshold=thr, interpret=impl in ("pallas", "mosaic"),
        config=config,
    )


# ------------------------------------------------------------- independent numpy (float64)
def numpy_ssd(x, dt, A, B, C, D, s0, dt_global, dt_threshold):
    x, dt, A, B, C, D = (np.asarray(jnp.asarray(a, jnp.float32), np.float64)
                         for a in (x, dt, A, B, C, D))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    s = np.zeros((b, h, p, n)) if s0 is None else np.array(s0, np.float64)
    y = np.zeros((b, l, h, p))
    for t in range(l):
        for hi in range(h):
            d = dt[:, t, hi]
            if dt_global is not None and bool(dt_global[hi]):
                d = np.where(d <= float(dt_threshold[hi]), 0.0, d)
            gi = hi // (h // g)
            s[:, hi] = (np.exp(d * A[hi])[:, None, None] * s[:, hi]
                        + (d[:, None] * x[:, t, hi])[:, :, None] * B[:, t, gi][:, None, :])
            y[:, t, hi] = np.einsum("bpn,bn->bp", s[:, hi], C[:, t, gi]) + D[hi] * x[:, t, hi]
    return y, s


def numpy_ss(x, dt, A, B, C, D, h0, dt_global, dt_threshold):
    x, dt, A, B, C, D = (np.asarray(jnp.asarray(a, jnp.float32), np.float64)
                         for a in (x, dt, A, B, C, D))
    b, l, e = x.shape
    n = A.shape[1]
    hs = np.zeros((b, e, n)) if h0 is None else np.array(h0, np.float64)
    glob = np.zeros(e, bool) if dt_global is None else np.asarray(dt_global, bool)
    thr = np.zeros(e) if dt_threshold is None else np.asarray(dt_threshold, np.float64)
    y = np.zeros((b, l, e))
    for t in range(l):
        d = np.where(glob & (dt[:, t] <= thr), 0.0, dt[:, t])  # [b, e]
        hs = np.exp(d[..., None] * A) * hs + (d * x[:, t])[..., None] * B[:, t, None, :]
        y[:, t] = np.einsum("ben,bn->be", hs, C[:, t]) + D * x[:, t]
    return y, hs


# -------------------------------------------------------------------------------- SSD tests
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", SSD_SHAPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_ssd_matches_reference(impl, shape, dtype):
    args, s0, filt = ssd_inputs(SSD_SHAPES[shape], dtype)
    y_ref, s_ref = run_ssd("reference", args, s0, filt)
    y, s = run_ssd(impl, args, s0, filt)
    assert y.dtype == jnp.float32 and s.dtype == jnp.float32  # precision policy
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    assert_close(y, y_ref, dtype, f"ssd {impl} y")
    assert_close(s, s_ref, dtype, f"ssd {impl} final state")


@pytest.mark.parametrize("with_filter,with_init", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("impl", IMPLS)
def test_ssd_filter_and_init_switches(impl, with_filter, with_init):
    args, s0, filt = ssd_inputs(SSD_SHAPES["T40_p16_n8"], jnp.float32, seed=1,
                                with_filter=with_filter, with_init=with_init)
    y_ref, s_ref = run_ssd("reference", args, s0, filt)
    y, s = run_ssd(impl, args, s0, filt)
    assert_close(y, y_ref, jnp.float32, f"ssd {impl} y")
    assert_close(s, s_ref, jnp.float32, f"ssd {impl} final state")


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_ssd_filtered_tokens_leave_global_state_unchanged(impl):
    shape = SSD_SHAPES["T40_p16_n8"]
    (x, dt, A, B, C, D), s0, filt = ssd_inputs(shape, jnp.float32, seed=2)
    k = 23  # tokens k.. get Δ under the threshold: global heads must ignore them
    dt = dt.at[:, k:].set(0.05)
    y_full, s_full = run_ssd(impl, (x, dt, A, B, C, D), s0, filt)
    _, s_prefix = run_ssd(impl, (x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], D), s0, filt)
    glob = np.asarray(filt["dt_global"])
    np.testing.assert_allclose(np.asarray(s_full)[:, glob], np.asarray(s_prefix)[:, glob],
                               rtol=1e-5, atol=1e-6)
    # Local heads still see those tokens (Δ = 0.05 > 0), so their state moves on.
    assert rel_err(np.asarray(s_full)[:, ~glob], np.asarray(s_prefix)[:, ~glob]) > 1e-3
    assert np.all(np.isfinite(np.asarray(y_full)))


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_ssd_matches_independent_numpy(impl):
    shape = SSDShape(b=1, l=37, h=4, p=8, g=2, n=16)
    args, s0, filt = ssd_inputs(shape, jnp.float32, seed=3)
    y_np, s_np = numpy_ssd(*args, s0, filt["dt_global"], filt["dt_threshold"])
    y, s = run_ssd(impl, args, s0, filt)
    assert_close(y, y_np, jnp.float32, f"ssd {impl} y vs numpy")
    assert_close(s, s_np, jnp.float32, f"ssd {impl} final state vs numpy")


def test_ssd_public_entry_dispatches_to_pallas():
    args, s0, filt = ssd_inputs(SSD_SHAPES["T63_groups2_p8_n16"], jnp.float32, seed=4)
    y_ref, s_ref = run_ssd("reference", args, s0, filt)
    y, s = ssd(*args, initial_state=s0, implementation="pallas", interpret=True, **filt)
    assert_close(y, y_ref, jnp.float32, "ssd(implementation='pallas') y")
    assert_close(s, s_ref, jnp.float32, "ssd(implementation='pallas') final state")


def test_ssd_pallas_precomputed_gram_matches_reference():
    """precompute_cb=True reads C Bᵀ from one XLA matmul instead of computing it in-kernel."""
    args, s0, filt = ssd_inputs(SSD_SHAPES["T63_groups2_p8_n16"], jnp.bfloat16, seed=6)
    y_ref, s_ref = run_ssd("reference", args, s0, filt)
    thr = filter_threshold(filt["dt_global"], filt["dt_threshold"], args[0].shape[2])
    config = dataclasses.replace(SSD_TEST_CONFIG, precompute_cb=True)
    y, s = ssd_pallas(*args, initial_state=s0, threshold=thr, interpret=True, config=config)
    assert_close(y, y_ref, jnp.bfloat16, "ssd pallas (precomputed C Bᵀ) y")
    assert_close(s, s_ref, jnp.bfloat16, "ssd pallas (precomputed C Bᵀ) final state")


def test_ssd_pallas_config_rejects_bad_blocks():
    with pytest.raises(ValueError, match="chunk"):
        SSDPallasConfig(chunk=48)
    with pytest.raises(ValueError, match="segments"):
        SSDPallasConfig(segments=0)
    with pytest.raises(ValueError, match="states_block_p"):
        SSDPallasConfig(states_block_p=24)
    args, _, _ = ssd_inputs(SSD_SHAPES["T63_groups2_p8_n16"], jnp.float32, seed=4)
    with pytest.raises(ValueError, match="y_dtype"):
        ssd_pallas(*args, interpret=True, y_dtype=jnp.int8)


# Sequence segments (a states pass split in pieces, folded by XLA, then the scan from each
# segment's initial state): one chunk per segment at least, so that the short test shapes split
# into several (uneven, padded) segments.
SSD_SEG_CONFIG = dataclasses.replace(SSD_TEST_CONFIG, segments=3, min_segment_chunks=1)
SSD_SEG_CONFIGS = {
    "pieces_of_1": SSD_SEG_CONFIG,  # 4 splits capped at a segment's chunks: one chunk each
    # 2 splits of 2 chunks over a 3-chunk segment: the last piece runs past its segment's end
    # (its Δ is masked to 0 there).
    "ragged_pieces": dataclasses.replace(SSD_SEG_CONFIG, state_splits=2),
    # states-pass programs over 32 rows of p, scan programs over 16 (T100_p32 has p = 32),
    # carrying Sᵀ (the default) or S
    "wide_states_blocks": dataclasses.replace(SSD_SEG_CONFIG, states_block_p=32),
    "untransposed_states": dataclasses.replace(SSD_SEG_CONFIG, states_block_p=32,
                                               states_t=False),
    "precomputed_cb": dataclasses.replace(SSD_SEG_CONFIG, precompute_cb=True),
}
SEG_SHAPES = {
    "T100_b1": SSDShape(b=1, l=100, h=4, p=16, g=1, n=16),  # 7 chunks -> 3 segments of 3
    "T63_groups2_p8_n16": SSD_SHAPES["T63_groups2_p8_n16"],  # b=2: ceil(3 / 2) = 2 segments
    "T100_p32_groups2": SSDShape(b=1, l=100, h=4, p=32, g=2, n=16),
}


@pytest.mark.parametrize("with_filter,with_init", [(True, True), (False, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("config", SSD_SEG_CONFIGS, ids=str)
@pytest.mark.parametrize("shape", SEG_SHAPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS[1:])
def test_ssd_pallas_segments_match_reference(impl, shape, config, dtype, with_filter, with_init):
    args, s0, filt = ssd_inputs(SEG_SHAPES[shape], dtype, seed=7, with_filter=with_filter,
                                with_init=with_init)
    y_ref, s_ref = run_ssd("reference", args, s0, filt)
    thr = filter_threshold(filt.get("dt_global"), filt.get("dt_threshold"), args[0].shape[2])
    y, s = ssd_pallas(*args, initial_state=s0, threshold=thr, interpret=(impl == "pallas"),
                      config=SSD_SEG_CONFIGS[config])
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    assert_close(y, y_ref, dtype, f"ssd {impl} (segments) y")
    assert_close(s, s_ref, dtype, f"ssd {impl} (segments) final state")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("impl", IMPLS[1:])
def test_ssd_pallas_bf16_y(impl, dtype):
    """y written in bf16 (fp32 accumulation), through segments and an initial state."""
    args, s0, filt = ssd_inputs(SEG_SHAPES["T100_b1"], dtype, seed=9)
    y_ref, s_ref = run_ssd("reference", args, s0, filt)
    thr = filter_threshold(filt["dt_global"], filt["dt_threshold"], args[0].shape[2])
    y, s = ssd_pallas(*args, initial_state=s0, threshold=thr, interpret=(impl == "pallas"),
                      config=SSD_SEG_CONFIG, y_dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert_close(y, y_ref, jnp.bfloat16, f"ssd {impl} y in bf16")
    assert_close(s, s_ref, dtype, f"ssd {impl} final state")


def test_ssd_segments_count():
    c = SSDPallasConfig(chunk=64, segments=4, min_segment_chunks=16)
    assert ssd_segments(1, 16384, c) == 4  # 256 chunks
    assert ssd_segments(1, 2048, c) == 2  # 32 chunks: at least 16 per segment
    assert ssd_segments(1, 1000, c) == 1
    assert ssd_segments(2, 16384, c) == 2  # the batch supplies programs too
    assert ssd_segments(8, 16384, c) == 1


def _cuda_module_text(fn, *args) -> str:
    """The program lowered for CUDA (works without a GPU): Pallas embeds each kernel's Triton
    IR, whose string table names the libdevice functions and inline PTX it calls."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_kernels_decays_are_exp2_not_expf():
    """Both kernels evaluate their decays as exp2 of base-2 log-decays (A pre-scaled by
    log2 e), never libdevice's longer expf: the SSD through exp2f, the selective scan by
    default through an inline ex2.approx.ftz (exp2f with fast_math=False)."""
    x = jnp.zeros((1, 4096, 4, 16), jnp.bfloat16)
    b = jnp.zeros((1, 4096, 1, 16), jnp.bfloat16)
    assert ssd_segments(1, 4096, SSDPallasConfig()) == 2  # the states pass is in the program
    ssd_text = _cuda_module_text(ssd_pallas, x, jnp.ones((1, 4096, 4)), -jnp.ones(4), b, b)
    assert ssd_text.count("custom_call @__gpu") == 2
    assert "__nv_exp2f" in ssd_text and "__nv_expf" not in ssd_text
    xs, bs = jnp.zeros((1, 256, 32)), jnp.zeros((1, 256, 16))
    ss = lambda config: _cuda_module_text(
        functools.partial(selective_scan_pallas, config=config),
        xs, xs, -jnp.ones((32, 16)), bs, bs)
    # The selective scan's default (fast_math): one inline ex2.approx.ftz per decay and an fma
    # per state update; without it, libdevice's exp2f. Both layouts.
    for layout in ("lane", "tile"):
        fast = ss(SelectiveScanPallasConfig(layout=layout))
        assert "ex2.approx.ftz.f32" in fast and "fma.rn.f32" in fast
        assert "__nv_exp2f" not in fast and "__nv_expf" not in fast
        plain = ss(SelectiveScanPallasConfig(layout=layout, fast_math=False))
        assert "__nv_exp2f" in plain and "__nv_expf" not in plain and "ex2.approx" not in plain
        # "lane" splits these 256 tokens into 4 segments: the states pass, then the scan.
        assert fast.count("custom_call @__gpu") == (2 if layout == "lane" else 1)
    assert lane_segments(1, 1, 256) == 4


def test_selective_scan_pallas_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="layout"):
        SelectiveScanPallasConfig(layout="rows")
    with pytest.raises(ValueError, match="block_e"):
        SelectiveScanPallasConfig(block_e=48)
    with pytest.raises(ValueError, match="segments"):
        SelectiveScanPallasConfig(layout="tile", segments=2)
    with pytest.raises(ValueError, match="segments"):
        SelectiveScanPallasConfig(segments=-1)
    # Unset blocks follow the layout ("tile": 4 channels a warp) and, for "lane", the state size.
    assert SelectiveScanPallasConfig(layout="tile").block_e == 4
    lane = SelectiveScanPallasConfig(num_warps=2)
    assert lane.block_e is None and lane.block_t is None
    assert (lane.resolve(16).block_e, lane.resolve(16).block_t) == (256, 2)  # 4 a thread
    assert (lane.resolve(32).block_e, lane.resolve(64).block_e) == (128, 64)
    assert lane.resolve(64).block_t == 1
    assert SelectiveScanPallasConfig(block_e=8).resolve(64).block_e == 8  # given: kept


def test_selective_scan_lane_channels_per_thread():
    """The lane layout's default channels per thread keep 2 n × channels near 128 registers,
    a power of two from 1 to 8 (the H100 sweep in docs/kernels.md: n = 8 / 16 / 32 / 64 ran fastest
    at 8 / 4 / 2 / 1)."""
    assert [lane_channels(n) for n in (1, 4, 8, 12, 16, 24, 32, 48, 64, 256)] == \
        [8, 8, 8, 4, 4, 2, 2, 1, 1, 1]


def test_selective_scan_lane_segments_count():
    assert lane_segments(1, 32, 16384) == 32  # mamba-1.4b, batch 1: 1,024 programs
    assert lane_segments(1, 32, 4096) == 32
    assert lane_segments(8, 32, 16384) == 4  # the batch supplies programs too
    assert lane_segments(1, 32, 200) == 2  # segments keep at least 64 tokens
    assert lane_segments(1, 32, 100) == 1
    assert lane_segments(64, 32, 16384) == 1


@pytest.mark.parametrize("config", [
    SelectiveScanPallasConfig(layout="tile", block_e=4, block_t=1, prefetch=False),
    SelectiveScanPallasConfig(layout="tile", block_e=4, block_t=3, prefetch=False),
    SelectiveScanPallasConfig(layout="tile", block_e=16, block_t=3, prefetch=True),
    # one step: reloads itself
    SelectiveScanPallasConfig(layout="tile", block_e=2, block_t=64, prefetch=True),
    SelectiveScanPallasConfig(block_e=4, block_t=1, segments=1, prefetch=False),
    SelectiveScanPallasConfig(block_e=8, block_t=3, segments=2, prefetch=True),
    # segments of one step (each reloads itself), a channel block wider than e
    SelectiveScanPallasConfig(block_e=32, block_t=4, segments=16, prefetch=True),
    SelectiveScanPallasConfig(block_e=4, block_t=2, segments=5, prefetch=False),
], ids=lambda c: (f"{c.layout}-e{c.block_e}t{c.block_t}s{c.segments}"
                  f"{'pf' if c.prefetch else ''}"))
def test_selective_scan_pallas_block_configs_match_reference(config):
    """The layouts and loop variants (prefetching the next step or not, one or many steps, one
    or many time segments, a channel block wider than e) all give the reference's answer
    (interpret mode)."""
    args, h0, filt = ss_inputs(SS_SHAPES["T63"], jnp.float32, seed=6)
    y_ref, h_ref = run_ss("reference", args, h0, filt)
    thr = filter_threshold(filt["dt_global"], filt["dt_threshold"], args[0].shape[-1])
    y, h = selective_scan_pallas(*args, initial_state=h0, threshold=thr, interpret=True,
                                 config=config)
    assert_close(y, y_ref, jnp.float32, f"selective_scan {config} y")
    assert_close(h, h_ref, jnp.float32, f"selective_scan {config} final state")


# --------------------------------------------------------------------- selective-scan tests
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", SS_SHAPES, ids=str)
@pytest.mark.parametrize("impl", SS_IMPLS)
def test_selective_scan_matches_reference(impl, shape, dtype):
    args, h0, filt = ss_inputs(SS_SHAPES[shape], dtype)
    y_ref, h_ref = run_ss("reference", args, h0, filt)
    y, h = run_ss(impl, args, h0, filt)
    assert y.dtype == jnp.float32 and h.dtype == jnp.float32
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    assert_close(y, y_ref, dtype, f"selective_scan {impl} y")
    assert_close(h, h_ref, dtype, f"selective_scan {impl} final state")


@pytest.mark.parametrize("with_filter,with_init", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("impl", SS_IMPLS)
def test_selective_scan_filter_and_init_switches(impl, with_filter, with_init):
    args, h0, filt = ss_inputs(SS_SHAPES["T63"], jnp.float32, seed=1,
                               with_filter=with_filter, with_init=with_init)
    y_ref, h_ref = run_ss("reference", args, h0, filt)
    y, h = run_ss(impl, args, h0, filt)
    assert_close(y, y_ref, jnp.float32, f"selective_scan {impl} y")
    assert_close(h, h_ref, jnp.float32, f"selective_scan {impl} final state")


@pytest.mark.parametrize("impl", ["reference", *SS_IMPLS])
def test_selective_scan_filtered_tokens_leave_global_state_unchanged(impl):
    (x, dt, A, B, C, D), h0, filt = ss_inputs(SS_SHAPES["T63"], jnp.float32, seed=2)
    k = 29
    dt = dt.at[:, k:].set(0.05)
    y_full, h_full = run_ss(impl, (x, dt, A, B, C, D), h0, filt)
    _, h_prefix = run_ss(impl, (x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], D), h0, filt)
    glob = np.asarray(filt["dt_global"])
    np.testing.assert_allclose(np.asarray(h_full)[:, glob], np.asarray(h_prefix)[:, glob],
                               rtol=1e-5, atol=1e-6)
    assert rel_err(np.asarray(h_full)[:, ~glob], np.asarray(h_prefix)[:, ~glob]) > 1e-3
    assert np.all(np.isfinite(np.asarray(y_full)))


@pytest.mark.parametrize("impl", ["reference", "pallas", "mosaic"])
def test_selective_scan_matches_independent_numpy(impl):
    args, h0, filt = ss_inputs(SSShape(b=2, l=21, e=12, n=8), jnp.float32, seed=3)
    y_np, h_np = numpy_ss(*args, h0, filt["dt_global"], filt["dt_threshold"])
    y, h = run_ss(impl, args, h0, filt)
    assert_close(y, y_np, jnp.float32, f"selective_scan {impl} y vs numpy")
    assert_close(h, h_np, jnp.float32, f"selective_scan {impl} final state vs numpy")


@pytest.mark.parametrize("shape,segments,seed", [
    (SSShape(b=1, l=300, e=40, n=16), 4, 7),  # e = 40 fits one channel block
    # larger state sizes: fewer channels a thread, one token a step from n = 64
    (SSShape(b=1, l=140, e=6, n=32), 2, 8),
    (SSShape(b=1, l=140, e=6, n=64), 2, 8),
], ids=["n16", "n32", "n64"])
def test_selective_scan_pallas_default_config_matches_independent_numpy(shape, segments, seed):
    """The public entry's default kernel config (the "lane" layout with its automatic time
    split and its blocks for n) against the float64 loop, filter and initial state on."""
    assert lane_segments(1, 1, shape.l) == segments  # the states pass and the combine run too
    args, h0, filt = ss_inputs(shape, jnp.float32, seed=seed)
    y_np, h_np = numpy_ss(*args, h0, filt["dt_global"], filt["dt_threshold"])
    y, h = selective_scan(*args, initial_state=h0, implementation="pallas", interpret=True,
                          **filt)
    assert_close(y, y_np, jnp.float32, f"selective_scan default pallas n={shape.n} y vs numpy")
    assert_close(h, h_np, jnp.float32,
                 f"selective_scan default pallas n={shape.n} final state vs numpy")


def test_selective_scan_public_entry_dispatches_to_pallas():
    args, h0, filt = ss_inputs(SS_SHAPES["T34"], jnp.bfloat16, seed=4)
    y_ref, h_ref = run_ss("reference", args, h0, filt)
    y, h = selective_scan(*args, initial_state=h0, implementation="pallas", interpret=True,
                          **filt)
    assert_close(y, y_ref, jnp.bfloat16, "selective_scan(implementation='pallas') y")
    assert_close(h, h_ref, jnp.bfloat16, "selective_scan(implementation='pallas') final state")


# ------------------------------------------- the fused Δ prologue (bias, softplus) and gate
def fused_ss_inputs(shape: SSShape, dtype, seed=0):
    """A Mamba-1 layer's raw Δ projection (Δ = softplus(dt + bias) spans ~0.01..3), its bias and
    in_proj's [x | z] output (the gate is its last e columns), with the other scan inputs."""
    (x, _, A, B, C, D), h0, filt = ss_inputs(shape, dtype, seed=seed)
    b, l, e, _ = dataclasses.astuple(shape)
    k = jax.random.split(jax.random.key(seed + 100), 3)
    dt_raw = (jax.random.normal(k[0], (b, l, e)) * 1.5 - 2.0).astype(dtype)
    dt_bias = jax.random.normal(k[1], (e,)) * 0.5
    xz = jax.random.normal(k[2], (b, l, 2 * e)).astype(dtype)
    # Δ near the threshold (0.3): the filter drops about a third of the global tokens
    return (x, dt_raw, A, B, C, D), h0, filt, dt_bias, xz


def numpy_fused_ss(x, dt_raw, A, B, C, D, h0, dt_global, dt_threshold, dt_bias, z):
    """float64: Δ = softplus(dt + bias), the scan, then y · silu(z)."""
    v = np.asarray(jnp.asarray(dt_raw, jnp.float32), np.float64) + np.asarray(dt_bias)
    dt = np.logaddexp(v, 0.0)
    y, h = numpy_ss(x, dt, A, B, C, D, h0, dt_global, dt_threshold)
    z = np.asarray(jnp.asarray(z, jnp.float32), np.float64)
    return y * z / (1.0 + np.exp(-z)), h


FUSED_CASES = [
    ("associative", None),
    ("pallas", None),  # the public default: "lane" with its automatic time split
    ("pallas", SS_TEST_CONFIG),  # 3 segments, ragged length: padding needs softplus(-inf) = 0
    ("pallas", SelectiveScanPallasConfig(layout="tile", block_e=8, block_t=4)),
    ("pallas", SS_MOSAIC_TEST_CONFIG),  # Δ and the gate over whole tiles, in shared memory
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", ["T1", "T63"])
@pytest.mark.parametrize("impl,config", FUSED_CASES,
                         ids=["associative", "pallas-default", "pallas-lane-seg3", "pallas-tile",
                              "pallas-mosaic"])
def test_selective_scan_fused_prologue_and_gate(impl, config, shape, dtype):
    """Δ = softplus(dt + bias) computed in the scan from the raw projection, the filter on that
    Δ, and y · silu(z) with z read as the last e columns of a wider [x | z] array, y written in
    the input dtype: against a float64 numpy loop (interpret mode for Pallas)."""
    sh = SS_SHAPES[shape]
    args, h0, filt, dt_bias, xz = fused_ss_inputs(sh, dtype, seed=11)
    y_np, h_np = numpy_fused_ss(*args, h0, filt["dt_global"], filt["dt_threshold"], dt_bias,
                                xz[..., sh.e:])
    kw = dict(initial_state=h0, dt_bias=dt_bias, dt_softplus=True, z=xz, out_dtype=dtype)
    if impl == "associative":
        y, h = selective_scan(*args, implementation="associative", **filt, **kw)
    else:
        thr = filter_threshold(filt["dt_global"], filt["dt_threshold"], sh.e)
        y, h = selective_scan_pallas(*args, threshold=thr, interpret=True, config=config, **kw)
    assert y.dtype == jnp.dtype(dtype) and h.dtype == jnp.float32
    assert_close(y, y_np, dtype, f"fused selective_scan {impl} y")
    assert_close(h, h_np, dtype, f"fused selective_scan {impl} final state")


@pytest.mark.parametrize("impl", ["associative", "pallas", "mosaic"])
def test_selective_scan_bias_without_softplus_on_padded_time(impl):
    """Δ = dt + bias with no softplus: padded tokens must still get Δ = 0 (the wrapper adds the
    bias before padding), so the final state is exact."""
    sh = SS_SHAPES["T63"]
    (x, dt, A, B, C, D), h0, filt = ss_inputs(sh, jnp.float32, seed=12)
    bias = jnp.full((sh.e,), 0.25)
    y_np, h_np = numpy_ss(x, dt + bias, A, B, C, D, h0, filt["dt_global"],
                          filt["dt_threshold"])
    if impl == "associative":
        y, h = selective_scan(x, dt, A, B, C, D, initial_state=h0, dt_bias=bias,
                              implementation="associative", **filt)
    else:
        thr = filter_threshold(filt["dt_global"], filt["dt_threshold"], sh.e)
        config = SS_TEST_CONFIG if impl == "pallas" else SS_MOSAIC_TEST_CONFIG
        y, h = selective_scan_pallas(x, dt, A, B, C, D, initial_state=h0, threshold=thr,
                                     dt_bias=bias, interpret=True, config=config)
    assert_close(y, y_np, jnp.float32, f"selective_scan {impl} dt + bias y")
    assert_close(h, h_np, jnp.float32, f"selective_scan {impl} dt + bias final state")


def test_selective_scan_rejects_bad_gate_and_bias():
    args, h0, _ = ss_inputs(SS_SHAPES["T34"], jnp.float32)
    e = args[0].shape[-1]
    with pytest.raises(ValueError, match=r"gate z must be \[b, l, >= 16\]"):
        selective_scan(*args, z=jnp.zeros((1, 34, 8)))
    with pytest.raises(ValueError, match="disagree on"):
        selective_scan(*args, z=jnp.zeros((1, 33, e)))
    with pytest.raises(ValueError, match=r"dt_bias must have shape \(16,\)"):
        selective_scan(*args, dt_bias=jnp.zeros((e + 1,)))


# ------------------------------------------------------------ compiled, realistic tile sizes
@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("config", [
    SelectiveScanPallasConfig(),
    # tile with fewer unrolled tokens than its default 32: that body, with the softplus and
    # the gate per token, takes minutes to compile (the model uses "lane")
    SelectiveScanPallasConfig(layout="tile", block_t=4),
    SelectiveScanMosaicConfig(),
], ids=["lane", "tile-t4", "mosaic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_selective_scan_pallas_gpu_fused_prologue_and_gate(dtype, config):
    """Compiled (fast-math exponentials) with the Δ prologue and the gate, realistic blocks."""
    sh = SSShape(b=2, l=999, e=256, n=16)  # ragged: padded tokens get a raw -inf
    args, h0, filt, dt_bias, xz = fused_ss_inputs(sh, dtype, seed=13)
    y_np, h_np = numpy_fused_ss(*args, h0, filt["dt_global"], filt["dt_threshold"], dt_bias,
                                xz[..., sh.e:])
    thr = filter_threshold(filt["dt_global"], filt["dt_threshold"], sh.e)
    y, h = selective_scan_pallas(*args, initial_state=h0, threshold=thr, dt_bias=dt_bias,
                                 dt_softplus=True, z=xz, out_dtype=dtype, config=config)
    assert_close(y, y_np, dtype, f"fused selective_scan pallas-gpu {config} y")
    assert_close(h, h_np, dtype, f"fused selective_scan pallas-gpu {config} final state")


# ------------------------------------------------------------------ gradients (training)
def _grads(fn, args, s0):
    """Gradients of a fixed random functional of (y, final state) w.r.t. every input."""
    def loss(args, s0):
        y, s = fn(args, s0)
        wy = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32)).reshape(s.shape)
        return jnp.sum(wy * y) + jnp.sum(ws * s)
    return jax.tree.leaves(jax.grad(loss, argnums=(0, 1))(args, s0))


@pytest.mark.parametrize("with_filter", [False, True])
def test_selective_scan_associative_gradients_match_reference(with_filter):
    # 63 tokens in chunks of 16: four rematerialised chunks, the last one padded.
    args, h0, filt = ss_inputs(SS_SHAPES["T63"], jnp.float32, seed=5, with_filter=with_filter)
    thr = filter_threshold(filt.get("dt_global"), filt.get("dt_threshold"), args[0].shape[-1])
    ref = _grads(lambda a, h: selective_scan_reference(*a, initial_state=h, threshold=thr),
                 args, h0)
    out = _grads(lambda a, h: selective_scan_associative(*a, initial_state=h, threshold=thr,
                                                         chunk_size=16), args, h0)
    assert len(out) == len(ref) == 7  # x, dt, A, B, C, D, initial state
    for i, (o, r) in enumerate(zip(out, ref, strict=True)):
        assert_close(o, r, jnp.float32, f"d input {i}")


@pytest.mark.parametrize("with_filter", [False, True])
def test_ssd_associative_gradients_match_reference(with_filter):
    args, s0, filt = ssd_inputs(SSD_SHAPES["T63_groups2_p8_n16"], jnp.float32, seed=6,
                                with_filter=with_filter)
    grads = {impl: _grads(lambda a, s, impl=impl: ssd(*a, initial_state=s, implementation=impl,
                                                      chunk_size=16, **filt), args, s0)
             for impl in ("reference", "associative")}
    assert len(grads["reference"]) == 7
    for i, (o, r) in enumerate(zip(grads["associative"], grads["reference"], strict=True)):
        assert_close(o, r, jnp.float32, f"d input {i}")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_ssd_pallas_gpu_default_blocks(dtype):
    """Default block sizes on a mamba2-like head (p=64, n=128), length not a multiple of s."""
    args, s0, filt = ssd_inputs(SSDShape(b=2, l=1000, h=8, p=64, g=2, n=128), dtype, seed=5)
    y_ref, s_ref = run_ssd("reference", args, s0, filt)
    thr = filter_threshold(filt["dt_global"], filt["dt_threshold"], 8)
    y, s = ssd_pallas(*args, initial_state=s0, threshold=thr)
    assert_close(y, y_ref, dtype, "ssd pallas-gpu y")
    assert_close(s, s_ref, dtype, "ssd pallas-gpu final state")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_ssd_pallas_gpu_default_blocks_segmented(dtype):
    """Default blocks split into 4 sequence segments of 4 chunks (the last one padded)."""
    args, s0, filt = ssd_inputs(SSDShape(b=1, l=1000, h=8, p=64, g=1, n=128), dtype, seed=8)
    y_ref, s_ref = run_ssd("reference", args, s0, filt)
    thr = filter_threshold(filt["dt_global"], filt["dt_threshold"], 8)
    config = dataclasses.replace(SSDPallasConfig(), segments=4, min_segment_chunks=2)
    assert ssd_segments(1, 1000, config) == 4
    y, s = ssd_pallas(*args, initial_state=s0, threshold=thr, config=config)
    assert_close(y, y_ref, dtype, "ssd pallas-gpu (segments) y")
    assert_close(s, s_ref, dtype, "ssd pallas-gpu (segments) final state")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("config", [
    None, SelectiveScanPallasConfig(), SelectiveScanPallasConfig(prefetch=False, fast_math=False),
    SelectiveScanPallasConfig(layout="tile"),
    SelectiveScanMosaicConfig(block_t=128, unroll=8, stages=2),
], ids=["default", "lane", "plain", "tile", "mosaic-t128"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_selective_scan_pallas_gpu_default_blocks(dtype, config):
    args, h0, filt = ss_inputs(SSShape(b=2, l=1000, e=256, n=16), dtype, seed=5)
    y_ref, h_ref = run_ss("reference", args, h0, filt)
    thr = filter_threshold(filt["dt_global"], filt["dt_threshold"], 256)
    y, h = selective_scan_pallas(*args, initial_state=h0, threshold=thr, config=config)
    assert_close(y, y_ref, dtype, "selective_scan pallas-gpu y")
    assert_close(h, h_ref, dtype, "selective_scan pallas-gpu final state")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("n,config", [
    *((n, SelectiveScanPallasConfig()) for n in (8, 32, 64)),
    *((n, SelectiveScanMosaicConfig()) for n in (4, 8, 32, 64)),
], ids=["lane-n8", "lane-n32", "lane-n64", "mosaic-n4", "mosaic-n8", "mosaic-n32",
        "mosaic-n64"])
def test_selective_scan_pallas_gpu_default_blocks_state_sizes(n, config):
    """The per-n blocks compiled: lane 8 / 2 / 1 channels a thread; mosaic 4 states a thread
    (2 at n = 4, so a warpgroup holds 64 channels)."""
    args, h0, filt = ss_inputs(SSShape(b=1, l=700, e=256, n=n), jnp.bfloat16, seed=9)
    y_ref, h_ref = run_ss("reference", args, h0, filt)
    thr = filter_threshold(filt["dt_global"], filt["dt_threshold"], 256)
    y, h = selective_scan_pallas(*args, initial_state=h0, threshold=thr, config=config)
    assert_close(y, y_ref, jnp.bfloat16, f"selective_scan pallas-gpu n={n} y")
    assert_close(h, h_ref, jnp.bfloat16, f"selective_scan pallas-gpu n={n} final state")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_selective_scan_mosaic_gpu_ragged_shapes(dtype):
    """Compiled Mosaic GPU kernel where every dimension needs padding: 63 tokens (blocks of
    64), 20 channels (a warpgroup holds 32), n = 12 (padded to 16), batch 2; filter and
    initial state on."""
    args, h0, filt = ss_inputs(SS_SHAPES["T63"], dtype, seed=14)
    y_np, h_np = numpy_ss(*args, h0, filt["dt_global"], filt["dt_threshold"])
    y, h = run_ss("mosaic-gpu", args, h0, filt)
    assert_close(y, y_np, dtype, "selective_scan mosaic-gpu ragged y")
    assert_close(h, h_np, dtype, "selective_scan mosaic-gpu ragged final state")


def test_selective_scan_default_config_follows_the_device():
    """No config: the Mosaic GPU kernel only when compiling for a Hopper (or newer) GPU; the
    Triton lane layout otherwise, and always in interpret mode."""
    assert default_config(interpret=True) == SelectiveScanPallasConfig()
    dev = jax.devices()[0]
    hopper = dev.platform == "gpu" and float(getattr(dev, "compute_capability", 0)) >= 9
    expected = SelectiveScanMosaicConfig() if hopper else SelectiveScanPallasConfig()
    assert default_config() == expected


@pytest.mark.parametrize("n,blocks", [
    (16, (16, 4, 32)),  # Mamba-1: 4 states a thread, 4 lanes a channel, 32 channels
    (12, (16, 4, 32)),  # padded to a power of two
    (8, (8, 4, 64)),
    (4, (4, 2, 64)),  # 2 states a thread: at most 64 channels (shared memory)
    (2, (4, 2, 64)),
    (64, (64, 4, 8)),  # 8 channels: 16-byte TMA rows of bf16 x
])
def test_selective_scan_mosaic_blocks(n, blocks):
    assert mosaic_blocks(n, 4) == blocks


def test_selective_scan_mosaic_rejects_large_states_and_default_avoids_them():
    with pytest.raises(ValueError, match="state sizes up to 64; got n=128"):
        mosaic_blocks(128, 4)
    assert default_config(n=128) == SelectiveScanPallasConfig()


@pytest.mark.parametrize("n", [4, 8, 16, 32, 64])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_selective_scan_mosaic_lowers_for_cuda(n, fused):
    """The compiled kernel's layouts, TMA copies and shared memory are checked when it is
    lowered for CUDA, which runs on any platform: each state size's blocks, with and without
    the fused options (more buffers)."""
    b, l, e = 1, 200, 64
    x = jnp.zeros((b, l, e), jnp.bfloat16)
    A, B = jnp.zeros((e, n)), jnp.zeros((b, l, n))
    kw = dict(D=jnp.zeros((e,)), initial_state=jnp.zeros((b, e, n)),
              threshold=jnp.zeros((e,)), dt_bias=jnp.zeros((e,)), dt_softplus=True,
              z=jnp.zeros((b, l, 2 * e), jnp.bfloat16)) if fused else {}
    f = jax.jit(lambda x, dt, A, B, C: selective_scan_pallas(
        x, dt, A, B, C, config=SelectiveScanMosaicConfig(), **kw))
    text = f.trace(x, x, A, B, B).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1


def test_selective_scan_mosaic_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="per_thread"):
        SelectiveScanMosaicConfig(per_thread=3)
    with pytest.raises(ValueError, match="multiple of unroll"):
        SelectiveScanMosaicConfig(block_t=20, unroll=8)
    with pytest.raises(ValueError, match="stages"):
        SelectiveScanMosaicConfig(stages=0)


# ---------------------------------------------------------------------------------------------
# Mamba2's gated RMSNorm (kernels/gated_rmsnorm.py)

GATED_NORM_IMPLS = [
    "pallas",
    pytest.param("pallas-gpu", marks=[pytest.mark.gpu, gpu_only]),
]


def _gated_norm_numpy(y, z, w, eps):
    """float64 numpy: w · g / sqrt(mean(g²) + eps), g = y · z · sigmoid(z)."""
    y, z, w = (np.asarray(a, np.float64) for a in (y, z, w))
    g = y * z / (1.0 + np.exp(-z))
    return w * g / np.sqrt(np.mean(g * g, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("impl", GATED_NORM_IMPLS)
@pytest.mark.parametrize("wdtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("ydtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gated_rms_norm_pallas_matches_reference(impl, wdtype, ydtype):
    """The kernel against the jnp form and a float64 numpy one, z wider than y (the in_proj
    output passed whole: the gate is its first E columns), rows not a power of two."""
    from longmamba_kernels.gated_rmsnorm import gated_rms_norm

    k = jax.random.split(jax.random.key(3), 3)
    y = (2.0 * jax.random.normal(k[0], (2, 13, 128))).astype(ydtype)
    z = jax.random.normal(k[1], (2, 13, 300)).astype(jnp.bfloat16)
    w = (1.0 + 0.2 * jax.random.normal(k[2], (128,))).astype(wdtype)
    ref = gated_rms_norm(y, z, w, eps=1e-5)
    out = gated_rms_norm(y, z, w, eps=1e-5, implementation="pallas",
                         interpret=impl == "pallas")
    assert out.dtype == w.dtype and out.shape == y.shape
    assert bool(jnp.isfinite(out).all())
    # same math as the jnp form but a different summation order: fp32 rounding, or one bf16
    # rounding step of the output at most
    tol = RTOL[jnp.dtype(wdtype)]
    assert_close(out, ref, wdtype, "gated_rms_norm pallas vs jnp")
    want = _gated_norm_numpy(y, z[..., :128], w, 1e-5)
    err = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
    assert err <= tol, f"gated_rms_norm vs numpy: {err:.2e} > {tol:.0e}"


def test_gated_rms_norm_rejects_bad_shapes():
    from longmamba_kernels.gated_rmsnorm import gated_rms_norm, supported

    y, w = jnp.ones((2, 3, 64)), jnp.ones((64,))
    with pytest.raises(ValueError, match="needs \\[..., >= 64\\]"):
        gated_rms_norm(y, jnp.ones((2, 3, 32)), w)
    with pytest.raises(ValueError, match="weight"):
        gated_rms_norm(y, y, jnp.ones((32,)))
    with pytest.raises(ValueError, match="power-of-two"):
        gated_rms_norm(jnp.ones((2, 48)), jnp.ones((2, 48)), jnp.ones((48,)),
                       implementation="pallas", interpret=True)
    with pytest.raises(ValueError, match="power-of-two"):  # two groups per row
        gated_rms_norm(y, y, w, group_size=32, implementation="pallas", interpret=True)
    with pytest.raises(ValueError, match="unknown implementation"):
        gated_rms_norm(y, y, w, implementation="associative")
    assert supported(4096, 4096) and not supported(1536, 1536) and not supported(64, 32)


# ---------------------------------------------------------------------------------------------
# The causal depthwise conv1d + silu (kernels/causal_conv.py)

CONV_IMPLS = [
    "pallas",
    pytest.param("pallas-gpu", marks=[pytest.mark.gpu, gpu_only]),
]


def _conv_numpy(x, w, bias, state, silu):
    """float64 numpy, a loop over taps: y_t = Σ_i w[i] · x_{t−K+1+i} (+ bias), silu."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    b, length, c = x.shape
    k = w.shape[0]
    prev = np.zeros((b, k - 1, c)) if state is None else np.asarray(state, np.float64)
    full = np.concatenate([prev, x], axis=1)
    y = np.zeros((b, length, c))
    for t in range(length):
        for i in range(k):
            y[:, t] += w[i] * full[:, t + i]
    if bias is not None:
        y += np.asarray(bias, np.float64)
    return y / (1.0 + np.exp(-y)) if silu else y


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("length,k,with_state,with_bias,splits", [
    (1, 4, False, True, (64,)),  # one token: three of the four taps read zeros
    (1, 4, True, True, (32, 16, 16)),  # one token: three taps read the state
    (2, 4, True, False, (32, 16, 16)),  # fewer tokens than the state holds
    (37, 4, False, True, (32, 16, 16)),  # ragged: the last block is partly past the end
    (37, 4, True, True, (64,)),
    (100, 2, True, True, (48, 16)),  # K = 2; a block of 16 channels
])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_causal_conv_pallas_matches_reference(impl, length, k, with_state, with_bias, splits,
                                              dtype):
    """The kernel reads its channels in place from a wider array (offset 16 of 96 columns) and
    writes them split; against the jnp form and a float64 loop. The final state is the last
    K−1 inputs, from the initial state when fewer tokens came in."""
    from longmamba_kernels.causal_conv import causal_conv1d

    c = sum(splits)
    key = jax.random.split(jax.random.key(length + k), 4)
    src = jax.random.normal(key[0], (2, length, 96)).astype(dtype)
    w = 0.5 * jax.random.normal(key[1], (k, c))
    bias = jax.random.normal(key[2], (c,)) if with_bias else None
    state = jax.random.normal(key[3], (2, k - 1, c)) if with_state else None
    kw = dict(initial_state=state, offset=16, splits=splits, activation="silu", out_dtype=dtype)
    ref, ref_state = causal_conv1d(src, w, bias, **kw)
    out, out_state = causal_conv1d(src, w, bias, implementation="pallas",
                                   interpret=impl == "pallas", block_t=16, **kw)
    assert [o.shape for o in out] == [(2, length, s) for s in splits]
    assert all(o.dtype == jnp.dtype(dtype) for o in out)
    out_all, ref_all = jnp.concatenate(out, -1), jnp.concatenate(ref, -1)
    assert_close(out_all, ref_all, dtype, "causal_conv pallas vs jnp")
    want = _conv_numpy(src[..., 16:16 + c], w, bias, state, silu=True)
    err = np.linalg.norm(np.asarray(out_all, np.float64) - want) / np.linalg.norm(want)
    assert err <= RTOL[jnp.dtype(dtype)], f"causal_conv vs numpy: {err:.2e}"
    x = np.asarray(src[..., 16:16 + c], np.float32)
    prev = np.zeros((2, k - 1, c), np.float32) if state is None else np.asarray(state)
    want_state = np.concatenate([prev, x], axis=1)[:, length:]
    np.testing.assert_array_equal(np.asarray(out_state), want_state)
    np.testing.assert_array_equal(np.asarray(ref_state), want_state)


def test_causal_conv_lowers_for_cuda():
    """The kernel lowers through Pallas's Triton path for a CUDA target at the models' shapes
    (mamba2-1.3b's x | B | C in place in in_proj's output; mamba-1.4b's x), on CPU."""
    from longmamba_kernels.causal_conv import causal_conv1d

    for width, offset, splits in ((8512, 4096, (4096, 128, 128)), (8192, 0, (4096,))):
        c = sum(splits)
        f = jax.jit(lambda s, w, b, st, offset=offset, splits=splits: causal_conv1d(
            s, w, b, initial_state=st, offset=offset, splits=splits, activation="silu",
            out_dtype=jnp.bfloat16, implementation="pallas"))
        args = (jax.ShapeDtypeStruct((1, 1000, width), jnp.bfloat16),
                jax.ShapeDtypeStruct((4, c), jnp.bfloat16),
                jax.ShapeDtypeStruct((c,), jnp.bfloat16),
                jax.ShapeDtypeStruct((1, 3, c), jnp.float32))
        text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "causal_conv1d" in text


def test_causal_conv_rejects_bad_input():
    from longmamba_kernels.causal_conv import causal_conv1d, default_block_c

    src, w = jnp.ones((2, 5, 96)), jnp.ones((4, 64))
    with pytest.raises(ValueError, match="do not fit in src of width 96"):
        causal_conv1d(src, w, offset=40)
    with pytest.raises(ValueError, match="bias \\(32,\\) must be \\(64,\\)"):
        causal_conv1d(src, w, jnp.ones((32,)))
    with pytest.raises(ValueError, match="initial_state \\(2, 4, 64\\) must be \\(2, 3, 64\\)"):
        causal_conv1d(src, w, initial_state=jnp.ones((2, 4, 64)))
    with pytest.raises(ValueError, match="splits \\(32, 16\\) must be positive and sum to 64"):
        causal_conv1d(src, w, splits=(32, 16))
    with pytest.raises(ValueError, match="multiple of 16"):
        causal_conv1d(src, w, splits=(56, 8), implementation="pallas", interpret=True)
    with pytest.raises(ValueError, match="activation 'relu'"):
        causal_conv1d(src, w, activation="relu")
    with pytest.raises(ValueError, match="unknown implementation"):
        causal_conv1d(src, w, implementation="associative")
    assert default_block_c((4096, 128, 128)) == 128 and default_block_c((64, 8, 8)) == 0
    assert default_block_c((48, 16)) == 16


@pytest.mark.parametrize("config", [SelectiveScanPallasConfig(), SS_MOSAIC_TEST_CONFIG],
                         ids=["lane", "mosaic"])
def test_selective_scan_pallas_rejects_disagreeing_shapes(config):
    """Both kernels' wrappers name every shape when B and C (or x and Δ) disagree."""
    x = jnp.ones((1, 8, 16))
    A, B = -jnp.ones((16, 4)), jnp.ones((1, 8, 4))
    with pytest.raises(ValueError, match=r"shapes disagree: .*C \(1, 8, 5\)"):
        selective_scan_pallas(x, x, A, B, jnp.ones((1, 8, 5)), interpret=True, config=config)
    with pytest.raises(ValueError, match=r"shapes disagree: x \(1, 8, 16\), dt \(1, 7, 16\)"):
        selective_scan_pallas(x, jnp.ones((1, 7, 16)), A, B, B, interpret=True, config=config)
