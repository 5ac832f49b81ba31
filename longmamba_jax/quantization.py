"""Weight-only int8 quantization (docs/generation.md, "Weight-only int8").

For each large projection kernel W [..., i, o] (stacked layers lead), per output channel o:

    scale[o] = max_i |W[i, o]| / 127,   Q[i, o] = round(W[i, o] / scale[o]) ∈ [−127, 127]
    y = (x @ Q) · scale                 # Q converted to the compute dtype inside the matmul

so |W − Q · scale| ≤ scale / 2 elementwise. A, Δ (dt_bias, Mamba-1's x_proj and dt_proj), D,
the norms, the conv and the state keep their dtypes; the embedding too (its rows are gathered,
and it identifies the weights a LongMamba calibration was measured on), and a tied model gets an
int8 copy of it as its head. `quantize(params)` returns `Params` of the same tree with
{"kernel": int8, "scale": fp32} where a float kernel was.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longmamba_jax.model import Params

__all__ = ["PROJECTIONS", "cast_floats", "dequantize", "is_quantized", "quantize",
           "quantize_kernel", "refuse_quantized"]

f32 = jnp.float32
# Weight groups whose "kernel" is quantized, wherever they sit in the tree: the mixers'
# projections, the hybrids' attention and MLP projections, Zamba2's per-use linear, the head.
PROJECTIONS = frozenset({"in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                         "gate_proj", "up_proj", "down_proj", "gate_up_proj", "linear",
                         "lm_head"})
_QMAX = 127


@jax.jit
def quantize_kernel(kernel):
    """kernel [..., i, o] float -> (int8 [..., i, o], fp32 scale [..., o]), symmetric per output
    channel: scale = absmax over i / 127 (a zero column gets scale 0 and zeros)."""
    w = kernel.astype(f32)
    scale = jnp.max(jnp.abs(w), axis=-2) / _QMAX  # [..., o]
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / safe[..., None, :]), -_QMAX, _QMAX).astype(jnp.int8)
    return q, scale


def is_quantized(params) -> bool:
    """Whether `params` (or a weights dict) holds int8 kernels from `quantize`."""
    weights = params.weights if isinstance(params, Params) else params
    return any(jnp.issubdtype(a.dtype, jnp.integer) for a in jax.tree.leaves(weights))


def refuse_quantized(params, what: str) -> None:
    """ValueError naming `what` when `params` are quantized."""
    if is_quantized(params):
        raise ValueError(f"{what} needs the float weights; these are int8-quantized "
                         "(longmamba_jax.quantize): use the Params you quantized them from")


def cast_floats(weights: dict, dtype) -> dict:
    """`weights` with every float leaf cast to `dtype`, except the scales of int8 kernels (fp32);
    the int8 kernels stay int8."""
    def cast(node, keep=False):
        if isinstance(node, dict):
            quantized = "scale" in node  # {"kernel": int8, "scale": fp32, maybe "bias"}
            return {k: cast(v, quantized and k == "scale") for k, v in node.items()}
        if keep or jnp.issubdtype(node.dtype, jnp.integer):
            return node
        return node.astype(dtype)

    return cast(weights)


def quantize(params: Params, *, dtype=jnp.int8) -> Params:
    """Weight-only int8 copy of `params`, for `forward`, `prefill`, `generate` (every
    `decode_impl`), LongMamba and DeciMamba, and the hybrid families.

    Every kernel of a group named in `PROJECTIONS` (Mamba's in_proj and out_proj, the hybrids'
    attention and MLP projections, the untied head) becomes int8 with a per-output-channel fp32
    scale; a tied model gets an int8 head of its own (its embedding, [d, V], quantized per
    vocabulary row) beside the embedding, which stays for the row gather. Everything else keeps
    its dtype. The result is a `Params` (a pytree: it goes through `jax.jit` as before) whose
    `dtype` (the compute dtype) is the original's.

    Args:
      params: `Params` with float weights (fp32 or bf16).
      dtype: the storage type of the kernels; only jnp.int8.

    Raises:
      ValueError: another dtype, weights already quantized.
      TypeError: params is not `Params`.

    Training, `export_torch` and saving a converted directory need the float weights and refuse
    quantized ones.
    """
    if not isinstance(params, Params):
        raise TypeError(f"params must be longmamba_jax.Params, got {type(params).__name__}")
    if jnp.dtype(dtype) != jnp.int8:
        raise ValueError(f"quantize supports dtype=jnp.int8 only, got {jnp.dtype(dtype)}")
    if is_quantized(params):
        raise ValueError("params are already quantized")
    if not jnp.issubdtype(params.dtype, jnp.floating):
        raise ValueError(f"params must hold float weights, got {params.dtype}")

    def walk(node):
        out = {}
        for key, value in node.items():
            if not isinstance(value, dict):
                out[key] = value
            elif key in PROJECTIONS and "kernel" in value:
                q, scale = quantize_kernel(value["kernel"])
                out[key] = {**value, "kernel": q, "scale": scale}
            else:
                out[key] = walk(value)
        return out

    weights = walk(params.weights)
    if "lm_head" not in weights:  # tied: the embedding [V, d] is the head; an int8 [d, V] copy
        q, scale = quantize_kernel(params.weights["embedding"]["weight"].T)
        weights["lm_head"] = {"kernel": q, "scale": scale}
    return Params(weights, params.config)


def dequantize(params: Params, dtype=None) -> Params:
    """The float weights a quantized model computes with: every int8 kernel replaced by
    kernel · scale in `dtype` (default fp32; the other weights keep theirs). A tied model keeps
    its dequantized head as an untied-style lm_head, so the logits are the quantized model's."""
    dtype = f32 if dtype is None else dtype

    def walk(node):
        if "scale" in node and "kernel" in node:
            kernel = (node["kernel"].astype(f32) * node["scale"][..., None, :]).astype(dtype)
            return {k: v for k, v in node.items() if k != "scale"} | {"kernel": kernel}
        return {k: walk(v) if isinstance(v, dict) else v for k, v in node.items()}

    return Params(walk(params.weights), params.config)
