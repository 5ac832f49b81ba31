"""The mixers' kernels (scan, SSD, causal conv, gated norm), partitioned over the mesh in context.

Same signatures as the `longmamba_kernels` entry points, which they call unchanged outside a
mesh. Under `jax.set_mesh(mesh)` the calls run under `jax.shard_map`: the batch over the
data-parallel axes ("data", "fsdp"), Mamba2's heads or Mamba-1's channels over "tensor"; XLA's
GSPMD partitions everything around them. Inside a context-parallel region (`context_parallel`)
each device holds one piece of the sequence; the conv reads the previous piece's last K − 1
inputs (a halo, `ppermute`) and the scans combine the pieces' states across devices:

    S_in(0) = S_0,   S_in(k) = exp(Σ_{piece k−1} Δ A) · S_in(k−1) + S_loc(k−1)
    Mamba2:   y_t += exp(Σ_{s<=t} Δ_s A) · C_t · S_in(k)     (per head; S_loc from a zero state)
    Mamba-1:  the piece is scanned again from S_in(k)

(docs/sharding.md, "Kernels under a mesh" and "Context parallelism").
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from longmamba_jax.sharding.mesh import BATCH_AXES, TENSOR
from longmamba_kernels import causal_conv as _conv
from longmamba_kernels import gated_rmsnorm as _norm
from longmamba_kernels import selective_scan as _scan
from longmamba_kernels import ssd as _ssd
from longmamba_kernels.common import (
    HIGHEST,
    apply_filter,
    delta_from_projection,
    filter_threshold,
    gate_input,
)

f32 = jnp.float32

_CONTEXT_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "longmamba_context_axis", default=None)


@contextlib.contextmanager
def context_parallel_region(axis: str):
    """Marks the code traced inside as one piece of a sequence split over the manual mesh axis
    `axis` (what `context_parallel` does inside its `shard_map`)."""
    token = _CONTEXT_AXIS.set(axis)
    try:
        yield
    finally:
        _CONTEXT_AXIS.reset(token)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the kernel calls being traced are partitioned."""

    mesh: object  # the abstract mesh in context
    batch: tuple[str, ...]  # Auto axes of size > 1 that split the batch
    tensor: str | None  # the Auto tensor axis, when of size > 1
    context: str | None  # the manual context-parallel axis, inside a context-parallel region

    def size(self, axes) -> int:
        axes = (axes,) if isinstance(axes, str) else axes or ()
        return math.prod(int(self.mesh.shape[a]) for a in axes)

    def batch_entry(self, batch: int):
        """Spec entry of a batch dimension; the data-parallel size must divide it."""
        if batch % self.size(self.batch):
            raise ValueError(f"batch {batch} is not a multiple of the data-parallel size "
                             f"{self.size(self.batch)} (mesh axes {self.batch})")
        return self.batch or None

    def tensor_entry(self, channels: int, what: str):
        if self.tensor is not None and channels % self.size(self.tensor):
            raise ValueError(f"{what} {channels} is not a multiple of the mesh's tensor axis "
                             f"({self.size(self.tensor)} devices)")
        return self.tensor

    def shard_map(self, fn, in_specs, out_specs):
        axes = set(self.batch) | ({self.tensor} if self.tensor else set())
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             axis_names=axes, check_vma=False)


def current_plan() -> Plan | None:
    """The partition of the kernel calls being traced, from the mesh in context; None when no
    axis applies (no mesh, or every relevant axis of size 1 or already manual)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    manual = set(mesh.manual_axes)

    def auto(name):
        return name in mesh.axis_names and name not in manual and mesh.shape[name] > 1

    batch = tuple(a for a in BATCH_AXES if auto(a))
    tensor = TENSOR if auto(TENSOR) else None
    context = _CONTEXT_AXIS.get()
    if context is not None and context not in manual:
        context = None
    if context is not None and (batch or tensor):
        raise ValueError(f"context parallelism over {context!r} does not combine with the auto "
                         f"axes {batch + ((tensor,) if tensor else ())} of size > 1")
    if not batch and tensor is None and context is None:
        return None
    return Plan(mesh, batch, tensor, context)


def _call(fn, args: dict, specs: dict, out_specs, plan: Plan):
    """fn(**args) under the plan's shard_map; None arguments are passed as None."""
    present = {k: v for k, v in args.items() if v is not None}
    mapped = plan.shard_map(lambda a: fn(**a), ({k: specs[k] for k in present},), out_specs)
    return mapped(present)


# ---------------------------------------------------------------------------------------------
# Mamba2 SSD


def ssd(x, dt, A, B, C, D=None, *, chunk_size: int = 256, initial_state=None, dt_global=None,
        dt_threshold=None, segment_ids=None, implementation: str = "associative",
        interpret: bool = False):
    """`longmamba_kernels.ssd.ssd`, partitioned by the mesh in context (module docstring).
    x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n], D [h] -> (y, state [b, h, p, n])."""
    static = dict(chunk_size=chunk_size, implementation=implementation, interpret=interpret)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state,
                dt_global=dt_global, dt_threshold=dt_threshold, segment_ids=segment_ids)
    plan = current_plan()
    if plan is None:
        return _ssd.ssd(**args, **static)
    if plan.context is not None:
        return _ssd_context(plan.context, **args, **static)
    b, _, h, _ = x.shape
    g = B.shape[2]
    bd = plan.batch_entry(b)
    t = plan.tensor_entry(h, "nheads")
    tsize = plan.size(t)
    pick_group = t is not None and g % tsize != 0
    if pick_group and tsize % g:
        raise ValueError(f"the tensor axis ({tsize} devices) must divide ngroups ({g}) or be a "
                         "multiple of it, so that each device's heads read whole groups")
    bc = P(bd, None, None if pick_group else t, None)
    specs = dict(x=P(bd, None, t, None), dt=P(bd, None, t), A=P(t), B=bc, C=bc, D=P(t),
                 initial_state=P(bd, t, None, None), dt_global=P(t), dt_threshold=P(t),
                 segment_ids=P(bd, None))

    def local(B, C, **a):
        if pick_group:  # this device's heads all read one group: group = index // (T / g)
            group = jax.lax.axis_index(t) // (tsize // g)
            B = jax.lax.dynamic_slice_in_dim(B, group, 1, axis=2)
            C = jax.lax.dynamic_slice_in_dim(C, group, 1, axis=2)
        return _ssd.ssd(B=B, C=C, **a, **static)

    return _call(local, args, specs, (P(bd, None, t, None), P(bd, t, None, None)), plan)


def _ssd_context(axis, x, dt, A, B, C, D, *, chunk_size, initial_state, dt_global,
                 dt_threshold, segment_ids, implementation, interpret):
    if segment_ids is not None:
        raise ValueError("context-parallel prefill does not take packed documents")
    y, s_loc = _ssd.ssd(x, dt, A, B, C, D, chunk_size=chunk_size, dt_global=dt_global,
                        dt_threshold=dt_threshold, implementation=implementation,
                        interpret=interpret)
    b, length, h, p = x.shape
    g, n = B.shape[2:]
    threshold = filter_threshold(dt_global, dt_threshold, h)
    log_decay = jnp.cumsum(apply_filter(dt.astype(f32), threshold) * A, axis=1)  # [b, l, h]
    s_in, s_out = pass_states(axis, log_decay[:, -1, :, None, None], s_loc, initial_state)
    # y_t[h] += exp(log_decay_t[h]) · S_in[h] C_t[g(h)]
    s_in = s_in.reshape(b, g, h // g, p, n)  # [b, g, h/g, p, n]
    carry = jnp.einsum("blgn,bgjpn->blgjp", C.astype(f32), s_in, precision=HIGHEST)
    carry = carry.reshape(b, length, h, p) * jnp.exp(log_decay)[..., None]
    return (y.astype(f32) + carry).astype(y.dtype), s_out


# ---------------------------------------------------------------------------------------------
# Mamba-1 selective scan


def selective_scan(x, dt, A, B, C, D=None, *, initial_state=None, dt_global=None,
                   dt_threshold=None, dt_bias=None, dt_softplus: bool = False, z=None,
                   out_dtype=f32, segment_ids=None, implementation: str = "associative",
                   interpret: bool = False):
    """`longmamba_kernels.selective_scan.selective_scan`, partitioned by the mesh in context.
    x/dt [b, l, e], A [e, n], B/C [b, l, n], D [e], z [b, l, >= e] -> (y, state [b, e, n])."""
    static = dict(dt_softplus=dt_softplus, out_dtype=out_dtype, implementation=implementation,
                  interpret=interpret)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state,
                dt_global=dt_global, dt_threshold=dt_threshold, dt_bias=dt_bias, z=z,
                segment_ids=segment_ids)
    plan = current_plan()
    if plan is None:
        return _scan.selective_scan(**args, **static)
    if plan.context is not None:
        return _scan_context(plan.context, **args, **static)
    b, _, e = x.shape
    bd = plan.batch_entry(b)
    t = plan.tensor_entry(e, "d_inner")
    if z is not None:  # the gate is z's last e columns: cut them here, then split by channel
        args["z"] = gate_input(z, e)
    specs = dict(x=P(bd, None, t), dt=P(bd, None, t), A=P(t, None), B=P(bd), C=P(bd), D=P(t),
                 initial_state=P(bd, t, None), dt_global=P(t), dt_threshold=P(t), dt_bias=P(t),
                 z=P(bd, None, t), segment_ids=P(bd, None))
    return _call(lambda **a: _scan.selective_scan(**a, **static), args, specs,
                 (P(bd, None, t), P(bd, t, None)), plan)


def _scan_context(axis, x, dt, A, B, C, D, *, initial_state, dt_global, dt_threshold, dt_bias,
                  z, segment_ids, dt_softplus, out_dtype, implementation, interpret):
    if segment_ids is not None:
        raise ValueError("context-parallel prefill does not take packed documents")
    common = dict(dt_global=dt_global, dt_threshold=dt_threshold, dt_bias=dt_bias,
                  dt_softplus=dt_softplus, implementation=implementation, interpret=interpret)
    _, s_loc = _scan.selective_scan(x, dt, A, B, C, D, **common)  # from a zero state
    threshold = filter_threshold(dt_global, dt_threshold, x.shape[2])
    delta = apply_filter(delta_from_projection(dt, dt_bias, dt_softplus), threshold)  # [b, l, e]
    log_decay = jnp.sum(delta, axis=1)[..., None] * A  # [b, e, n]
    s_in, s_out = pass_states(axis, log_decay, s_loc, initial_state)
    y, _ = _scan.selective_scan(x, dt, A, B, C, D, initial_state=s_in, z=z,
                                out_dtype=out_dtype, **common)
    return y, s_out


def pass_states(axis: str, log_decay, s_loc, s0):
    """The state entering this device's piece and the state after the last piece.

    log_decay: the piece's total log-decay Σ Δ A, broadcastable to s_loc; s_loc: its final
    state from a zero state [b, ...]; s0: the state before the first piece or None. Every
    device gathers all pieces' (decay, state) over `axis` and folds them in order:
    S_in(k+1) = exp(log_decay_k) · S_in(k) + s_loc_k.
    """
    decays = jax.lax.all_gather(log_decay, axis)  # [P, ...]
    states = jax.lax.all_gather(s_loc.astype(f32), axis)  # [P, b, ...]
    s = jnp.zeros_like(states[0]) if s0 is None else s0.astype(f32)
    entering = []
    for k in range(states.shape[0]):
        entering.append(s)
        s = jnp.exp(decays[k]) * s + states[k]
    s_in = jax.lax.dynamic_index_in_dim(jnp.stack(entering), jax.lax.axis_index(axis),
                                        keepdims=False)
    return s_in, s


# ---------------------------------------------------------------------------------------------
# Causal conv and gated norm


def causal_conv1d(src, weight, bias=None, *, initial_state=None, offset: int = 0, splits=None,
                  activation=None, out_dtype=None, segment_ids=None, lengths=None,
                  implementation="reference", interpret: bool = False, **blocks):
    """`longmamba_kernels.causal_conv.causal_conv1d`, partitioned by the mesh in context: the
    Pallas kernel over the batch axes (its jnp form under tensor parallelism, where XLA splits
    the channels); in a context-parallel region, with the previous piece's inputs as halo."""
    kw = dict(offset=offset, splits=splits, activation=activation, out_dtype=out_dtype,
              implementation=implementation, interpret=interpret, **blocks)
    plan = current_plan()
    if plan is None or (plan.context is None and implementation != "pallas"):
        return _conv.causal_conv1d(src, weight, bias, initial_state=initial_state,
                                   segment_ids=segment_ids, lengths=lengths, **kw)
    if plan.context is not None:
        if segment_ids is not None or lengths is not None:
            raise ValueError("context-parallel prefill does not take padding or packed documents")
        halo = _halo(plan.context, src, weight.shape, offset, initial_state)
        outs, state = _conv.causal_conv1d(src, weight, bias, initial_state=halo, **kw)
        last = jax.lax.axis_index(plan.context) == plan.size(plan.context) - 1
        return outs, jax.lax.psum(jnp.where(last, state, 0.0), plan.context)
    if plan.tensor is not None:
        kw["implementation"] = "reference"  # channels split by XLA; no per-device kernel
        return _conv.causal_conv1d(src, weight, bias, initial_state=initial_state,
                                   segment_ids=segment_ids, lengths=lengths, **kw)
    bd = plan.batch_entry(src.shape[0])
    n_out = 1 if splits is None else len(splits)
    args = dict(src=src, weight=weight, bias=bias, initial_state=initial_state,
                segment_ids=segment_ids, lengths=lengths)
    specs = dict(src=P(bd), weight=P(), bias=P(), initial_state=P(bd), segment_ids=P(bd),
                 lengths=P(bd))
    return _call(lambda **a: _conv.causal_conv1d(**a, **kw), args, specs,
                 ((P(bd),) * n_out, P(bd)), plan)


def _halo(axis, src, weight_shape, offset, initial_state):
    """The K − 1 conv inputs before this device's piece: the previous piece's last ones (the
    initial state on the first device), fp32 [b, K−1, C]."""
    k, c = weight_shape
    b, length, _ = src.shape
    if length < k - 1:
        raise ValueError(f"context-parallel pieces of {length} tokens are shorter than the conv "
                         f"window's K − 1 = {k - 1}")
    first = jnp.zeros((b, k - 1, c), f32) if initial_state is None else initial_state.astype(f32)
    if k == 1:
        return first
    tail = src[:, length - (k - 1):, offset:offset + c].astype(f32)
    pieces = int(jax.sharding.get_abstract_mesh().shape[axis])
    received = jax.lax.ppermute(tail, axis, [(i, i + 1) for i in range(pieces - 1)])
    return jnp.where(jax.lax.axis_index(axis) == 0, first, received)


def gated_rms_norm(y, z, weight, *, eps: float = 1e-5, group_size: int | None = None,
                   implementation: str = "reference", interpret: bool = False):
    """`longmamba_kernels.gated_rmsnorm.gated_rms_norm`, partitioned by the mesh in context:
    the Pallas kernel over the batch axes (and "tensor" when the norm groups fall within a
    device's channels; otherwise the jnp form, whose sums of squares XLA reduces across)."""
    kw = dict(eps=eps, interpret=interpret)
    plan = current_plan()
    if plan is None or plan.context is not None or implementation != "pallas":
        return _norm.gated_rms_norm(y, z, weight, group_size=group_size,
                                    implementation=implementation, **kw)
    e = y.shape[-1]
    group = e if group_size is None else group_size
    t, local = plan.tensor, e
    if t is not None:
        local = e // plan.size(t)
        if e % plan.size(t) or local % group:
            t = None
    if (t is None and plan.tensor is not None) or not _norm.supported(local, group):
        return _norm.gated_rms_norm(y, z, weight, group_size=group_size,
                                    implementation="reference", **kw)
    bd = plan.batch_entry(y.shape[0])
    mid = (None,) * (y.ndim - 2)
    return _call(lambda **a: _norm.gated_rms_norm(**a, group_size=group, implementation="pallas",
                                                  **kw),
                 dict(y=y, z=z[..., :e], weight=weight),
                 dict(y=P(bd, *mid, t), z=P(bd, *mid, t), weight=P(t)), P(bd, *mid, t), plan)
