"""Causal attention of the hybrid families: rotary embeddings and three implementations.

Shapes (b batch, T queries, S keys, N query heads, K key/value heads, H head_dim, G = N / K):
    q [b, T, N, H], k, v [b, S, K, H]  ->  out [b, T, N, H]
Query t sits at absolute position `q_start + t`; key s at position s. Query t sees key s when
    s <= q_start + t  and  kv_valid[b, s]      (and always itself, so no row is empty)
softmax(q·k · scale) in fp32; q·k and p·v accumulate in fp32.

Implementations (docs/families.md, "Attention"), one chosen by `choose_implementation`:
- "cudnn": `jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`, the
  cuDNN flash kernel (GPU, bf16/fp16; no cache and no padding: T == S, q_start == 0);
- "xla": the same function with an explicit [b, 1, T, S] mask (materialises T·S logits per
  head: short prompts and decode steps);
- "blockwise": flash-style online softmax in jnp over [block_q, block_k] tiles, key tiles past
  the causal frontier skipped: memory O(block_q·block_k) per head, never [T, S].
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

f32 = jnp.float32
IMPLEMENTATIONS = ("cudnn", "xla", "blockwise")
# "xla" materialises T·S logits per head; above this many it is blockwise (or cuDNN).
XLA_MAX_TS = 1 << 20
_NEG = -1e30  # masked logit: finite, so a tile with no visible key yields no NaN

logger = logging.getLogger("longmamba_jax")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the blockwise implementation."""

    block_q: int = 512
    block_k: int = 512

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()


def rope(x, positions, theta: float, rotary_dim: int):
    """Rotary embedding (rotate-half form) on the first `rotary_dim` dims of each head.

    x [b, l, heads, H]; positions int32 [b, l] (per row) or [l]. cos / sin and the rotation in
    fp32, the result in x's dtype.
    """
    half = rotary_dim // 2
    inv_freq = 1.0 / theta ** (jnp.arange(0, rotary_dim, 2, dtype=f32) / rotary_dim)  # [H_r/2]
    freqs = positions.astype(f32)[..., None] * inv_freq  # [b, l, H_r/2] or [l, H_r/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [b, l, 1, H_r]
    if positions.ndim == 1:
        emb = emb[None]
    xr = x[..., :rotary_dim].astype(f32)
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = (xr * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)
    if rotary_dim == x.shape[-1]:
        return out
    return jnp.concatenate([out, x[..., rotary_dim:]], axis=-1)


def choose_implementation(q_len: int, kv_len: int, dtype, head_dim: int, *,
                          masked: bool) -> str:
    """The implementation for these (static) shapes; `masked` = a cache or a padding mask.

    cuDNN where it applies (GPU, bf16/fp16, head_dim a multiple of 8 up to 128, a plain causal
    prompt); else "xla" while T·S <= XLA_MAX_TS; else "blockwise".
    """
    if (not masked and q_len == kv_len and jax.default_backend() == "gpu"
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128):
        choice = "cudnn"
    elif q_len * kv_len <= XLA_MAX_TS:
        choice = "xla"
    else:
        choice = "blockwise"
    logger.debug("attention: %s for T=%d S=%d %s", choice, q_len, kv_len, jnp.dtype(dtype))
    return choice


def _mask(q_start, t: int, s: int, kv_valid):
    """[b or 1, T, S] bool: key s visible to query t (causal, valid, or the query itself)."""
    q_pos = q_start + jnp.arange(t, dtype=jnp.int32)[:, None]  # [T, 1]
    k_pos = jnp.arange(s, dtype=jnp.int32)[None, :]  # [1, S]
    causal = k_pos <= q_pos
    if kv_valid is None:
        return causal[None]
    return causal[None] & (kv_valid[:, None, :] | (k_pos == q_pos)[None])


def attention(q, k, v, *, scale: float, q_start=0, kv_valid=None,
              implementation: str | None = None, block_sizes: BlockSizes | None = None):
    """Causal (grouped-query) attention, see the module docstring.

    Args:
      q: [b, T, N, H]; k, v: [b, S, K, H] (K divides N), all one dtype.
      scale: logit scale.
      q_start: absolute position of q[:, 0] (int or int32 []), keys at 0 … S − 1.
      kv_valid: bool [b, S] (False: a padding or an empty cache slot), or None (all valid).
      implementation: one of IMPLEMENTATIONS, or None for `choose_implementation`.
      block_sizes: tiles of "blockwise".

    Returns:
      [b, T, N, H] in q's dtype.
    """
    b, t, n, hd = q.shape
    s = k.shape[1]
    masked = kv_valid is not None or not (isinstance(q_start, int) and q_start == 0 and s == t)
    if implementation is None:
        implementation = choose_implementation(t, s, q.dtype, hd, masked=masked)
    if implementation == "cudnn":
        if masked:
            raise ValueError("attention: the cuDNN implementation serves a plain causal prompt "
                             "only (no cache, no padding mask)")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            implementation="cudnn")
    if implementation == "xla":
        mask = _mask(jnp.asarray(q_start, jnp.int32), t, s, kv_valid)[:, None]  # [b, 1, T, S]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            implementation="xla")
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, scale=scale, q_start=q_start, kv_valid=kv_valid,
                                   block_sizes=block_sizes)
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")


def blockwise_attention(q, k, v, *, scale: float, q_start=0, kv_valid=None,
                        block_sizes: BlockSizes | None = None):
    """Online-softmax attention over tiles (FlashAttention-2, Algorithm 1, in jnp).

    Query tiles run one after another (`lax.map`); within a tile a `fori_loop` walks the key
    tiles up to the tile's causal frontier, carrying the running max m, normaliser l and
    output accumulator (fp32). Same arguments and result as `attention`.
    """
    bs = block_sizes or BlockSizes.get_default()
    b, t, n, hd = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = min(bs.block_q, t), min(bs.block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    q_start = jnp.asarray(q_start, jnp.int32)
    qp = jnp.pad(q, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0)))
    qp = qp.reshape(b, nq, bq, kh, g, hd).transpose(1, 0, 2, 3, 4, 5)  # [nq, b, bq, K, G, H]
    kp = jnp.pad(k, ((0, 0), (0, nk * bk - s), (0, 0), (0, 0)))  # [b, S', K, H]
    vp = jnp.pad(v, ((0, 0), (0, nk * bk - s), (0, 0), (0, 0)))
    valid = jnp.ones((b, s), bool) if kv_valid is None else kv_valid
    valid = jnp.pad(valid, ((0, 0), (0, nk * bk - s)))  # padded keys invalid

    def q_tile(args):
        i, qt = args  # qt [b, bq, K, G, H]
        q_pos = q_start + i * bq + jnp.arange(bq, dtype=jnp.int32)  # [bq]
        # key tiles holding a position <= the tile's last query
        stop = jnp.minimum(nk, (q_start + (i + 1) * bq + bk - 1) // bk)

        def k_tile(j, carry):
            m, l, acc = carry  # [b, K, G, bq], same, [b, K, G, bq, H]
            kt = jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=1)  # [b, bk, K, H]
            vt = jax.lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=1)
            ok = jax.lax.dynamic_slice_in_dim(valid, j * bk, bk, axis=1)  # [b, bk]
            k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
            seen = (k_pos[None, :] <= q_pos[:, None])[None] & (
                ok[:, None, :] | (k_pos[None, :] == q_pos[:, None])[None])  # [b, bq, bk]
            logits = jnp.einsum("bqkgh,bskh->bkgqs", qt, kt, preferred_element_type=f32) * scale
            logits = jnp.where(seen[:, None, None], logits, _NEG)  # [b, K, G, bq, bk]
            m_new = jnp.maximum(m, logits.max(-1))
            p = jnp.exp(logits - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), vt,
                            preferred_element_type=f32)
            return m_new, l, acc * corr[..., None] + pv

        init = (jnp.full((b, kh, g, bq), _NEG, f32), jnp.zeros((b, kh, g, bq), f32),
                jnp.zeros((b, kh, g, bq, hd), f32))
        _, l, acc = jax.lax.fori_loop(0, stop, k_tile, init)
        out = acc / l[..., None]  # [b, K, G, bq, H]
        return out.transpose(0, 3, 1, 2, 4).reshape(b, bq, n, hd).astype(q.dtype)

    out = jax.lax.map(q_tile, (jnp.arange(nq, dtype=jnp.int32), qp))  # [nq, b, bq, N, H]
    return out.transpose(1, 0, 2, 3, 4).reshape(b, nq * bq, n, hd)[:, :t]
