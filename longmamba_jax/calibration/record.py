"""`calibrate`: run the model on windows of `train_len` tokens taken evenly across a token
stream (optionally packed documents: `segment_ids`), record Δ of every SSM layer (after
softplus; a hybrid model's Mamba2 layers, in order), and stream them batch by batch into a
`CalibrationBuilder`. `weights_digest` identifies the weights a calibration was measured on."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from longmamba_jax.backends import resolve_backend
from longmamba_jax.calibration.artifact import Calibration
from longmamba_jax.calibration.builder import CalibrationBuilder
from longmamba_jax.calibration.validate import check_int
from longmamba_jax.config import MambaConfig
from longmamba_jax.model import Params, apply_model
from longmamba_jax.packing import resolve_segment_ids
from longmamba_kernels.common import document_index


def window_starts(n_tokens: int, train_len: int, num_windows: int) -> np.ndarray:
    """Start offsets of `num_windows` windows of `train_len` spread evenly over the stream."""
    if n_tokens < train_len:
        raise ValueError(f"the token stream has {n_tokens} tokens, fewer than train_len="
                         f"{train_len}")
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")
    return np.linspace(0, n_tokens - train_len, num_windows).round().astype(np.int64)


# The small tensors the digest covers (whichever the architecture has): per layer A_log, D, the
# Δ bias, the conv weights, the norms; and the first rows of the embedding.
_DIGEST_PATHS = (("layers", "mixer", "A_log"), ("layers", "mixer", "D"),
                 ("layers", "mixer", "dt_bias"), ("layers", "mixer", "dt_proj", "bias"),
                 ("layers", "mixer", "conv1d", "bias"), ("layers", "mixer", "conv1d", "kernel"),
                 ("layers", "mixer", "norm", "weight"), ("layers", "norm", "weight"),
                 ("norm_f", "weight"), ("embedding", "weight"))
_EMBEDDING_ROWS = 8


def weights_digest(params: Params) -> str | None:
    """A short digest of the weights a calibration is measured on (docs/reliability.md,
    "Calibrations"): sha256 over A_log, D, the Δ bias, the conv weights, the norm weights and
    the first embedding rows, each rounded to bf16 first, so fp32 and bf16 copies of one model
    agree. None when the weights are traced (inside a caller's jit)."""
    h = hashlib.sha256()
    for path in _DIGEST_PATHS:
        node = params.weights
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            continue
        if isinstance(node, jax.core.Tracer):
            return None
        if path[0] == "embedding":
            node = node[:_EMBEDDING_ROWS]
        a = np.asarray(jax.device_get(node)).astype(np.float32).astype(ml_dtypes.bfloat16)
        h.update(f"{'/'.join(path)}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).view(np.uint16).astype("<u2").tobytes())
    return h.hexdigest()[:16]


def check_stream(params: Params, tokens, train_len: int) -> np.ndarray:
    """The calibration token stream as 1-D int64, or one ValueError saying what is wrong."""
    array = np.asarray(tokens)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]  # a batch of one
    if array.ndim != 1:
        raise ValueError(f"tokens must be a 1-D token stream (or [1, n]), got shape "
                         f"{array.shape}")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"tokens must be integer token ids, got dtype {array.dtype}")
    if array.size < train_len:
        raise ValueError(f"the token stream has {array.size} tokens, fewer than train_len="
                         f"{train_len}")
    vocab = params.config.padded_vocab_size
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}) for this model; the stream has ids "
                         f"in [{low}, {high}] (is the tokenizer the model's?)")
    return array.astype(np.int64)


def _is_document_list(tokens) -> bool:
    """Whether `tokens` is a list (or tuple) of documents rather than one stream of ids."""
    return isinstance(tokens, (list, tuple)) and len(tokens) > 0 and np.ndim(tokens[0]) > 0


def pack_documents(documents) -> tuple[np.ndarray, np.ndarray]:
    """Documents (1-D token sequences) as one stream and its segment ids (the document's index
    per token); empty documents are dropped."""
    parts = []
    for i, doc in enumerate(documents):
        array = np.asarray(doc)
        if array.ndim != 1:
            raise ValueError(f"documents[{i}] must be a 1-D token sequence, got shape "
                             f"{array.shape}")
        if array.size:
            parts.append(array)
    if not parts:
        raise ValueError("the documents are all empty")
    ids = np.repeat(np.arange(len(parts), dtype=np.int32), [p.size for p in parts])
    return np.concatenate(parts), ids


def check_segments(segment_ids, cu_seqlens, n_tokens: int) -> np.ndarray | None:
    """The document index (int32 [n_tokens], from 0) of a packed stream, from `segment_ids`
    [n_tokens] (or [1, n_tokens]) or `cu_seqlens` as `longmamba_jax.packing` reads them; None
    for a plain stream: neither given, or ids that never change (one document)."""
    seg = segment_ids
    if seg is not None:
        seg = np.asarray(seg)
        seg = seg[None] if seg.ndim == 1 else seg
    try:
        seg = resolve_segment_ids((1, n_tokens), seg, cu_seqlens)
    except ValueError as e:
        raise ValueError(f"{e} (calibrate takes one segment id per token of the "
                         f"{n_tokens}-token stream)") from None
    if seg is None:
        return None
    doc = np.asarray(document_index(seg))[0]
    return doc if doc[-1] > 0 else None


def prepare_stream(params: Params, tokens, train_len: int, segment_ids=None,
                   cu_seqlens=None) -> tuple[np.ndarray, np.ndarray | None]:
    """The calibration stream (int64 [n]) and, when packed, its document index (int32 [n]), or
    one ValueError saying what is wrong. `tokens` may be a list of documents."""
    if _is_document_list(tokens):
        if segment_ids is not None or cu_seqlens is not None:
            raise ValueError("give tokens as a list of documents or segment_ids / cu_seqlens "
                             "with one stream, not both")
        tokens, segment_ids = pack_documents(tokens)
    stream = check_stream(params, tokens, train_len)
    return stream, check_segments(segment_ids, cu_seqlens, stream.shape[0])


def layer_A(params: Params) -> list[np.ndarray]:
    """A = −exp(A_log) per SSM layer: [channels] (Mamba2) or [channels, d_state] (Mamba-1)."""
    a_log = np.asarray(params.weights["layers"]["mixer"]["A_log"], np.float32)
    return [-np.exp(a) for a in a_log]


def _delta_batches(params: Params, stream: np.ndarray, doc: np.ndarray | None, *,
                   train_len: int, num_windows: int, backend: str, batch_size: int,
                   progress: bool):
    """Yields Δ of every SSM layer for successive batches of windows: [n_ssm_layer, w, l, C].
    `stream` and `doc` come from `prepare_stream`; with `doc`, every window runs with its own
    segment ids (docs/design.md, "LongMamba calibration")."""
    starts = window_starts(stream.shape[0], train_len, num_windows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    impl = resolve_backend(backend)
    from tqdm.auto import tqdm

    with tqdm(total=num_windows, desc="calibration windows", unit="window",
              disable=not progress) as bar:
        for i in range(0, num_windows, batch_size):
            batch_starts = starts[i : i + batch_size]
            batch = np.stack([stream[s : s + train_len] for s in batch_starts])
            seg = None
            if doc is not None:  # [w, l]: where the id changes a document starts from zero
                seg = jnp.asarray(np.stack([doc[s : s + train_len] - doc[s]
                                            for s in batch_starts]))
            dt = apply_model(params, jnp.asarray(batch, jnp.int32), backend=impl,
                             capture_dt=True, last_n=1, segment_ids=seg).dt
            # dt: [n_ssm_layer, w, l, C]
            yield np.asarray(jax.device_get(dt))
            bar.update(len(batch))


def record_deltas(params: Params, tokens, *, train_len: int, num_windows: int = 100,
                  backend: str = "auto", batch_size: int = 4, progress: bool = True,
                  segment_ids=None, cu_seqlens=None) -> list[np.ndarray]:
    """Δ of every layer on each window: a list over layers of [windows, train_len, channels].
    Windows and `tokens` / `segment_ids` / `cu_seqlens` as in `calibrate`.

    This holds every window in memory (windows × train_len × channels floats per layer);
    `calibrate` streams them instead."""
    cfg = params.config
    train_len = check_int("train_len", train_len, minimum=1)
    num_windows = check_int("num_windows", num_windows, minimum=1)
    stream, doc = prepare_stream(params, tokens, train_len, segment_ids, cu_seqlens)
    out = [np.empty((num_windows, train_len, cfg.channels), np.float32)
           for _ in range(cfg.n_ssm_layer)]
    i = 0
    for dt in _delta_batches(params, stream, doc, train_len=train_len, num_windows=num_windows,
                             backend=backend, batch_size=batch_size, progress=progress):
        for layer in range(cfg.n_ssm_layer):
            out[layer][i : i + dt.shape[1]] = dt[layer]
        i += dt.shape[1]
    return out


def calibrate(params: Params, tokens, *, train_len: int, num_windows: int = 100,
              clamp_top: float = 0.10, aggregate: str = "mean", backend: str = "auto",
              batch_size: int = 4, progress: bool = True, segment_ids=None,
              cu_seqlens=None, storage: str = "auto") -> Calibration:
    """LongMamba calibration of `params` on a token stream, plain or packed (docs/design.md,
    "LongMamba calibration").

    Windows are streamed through a `CalibrationBuilder` batch by batch, so host memory is one
    batch of Δ plus the per-channel result, whatever `num_windows` (a 48-layer, 4096-channel
    Mamba-1 with 100 windows of 2,000 tokens would otherwise need 157 GB); lower `batch_size`
    to bound the batch (n_layer × batch_size × train_len × channels floats).

    A packed stream (several documents: `segment_ids`, `cu_seqlens`, or `tokens` as a list of
    documents) places its windows as a plain stream does, evenly over the whole stream, and
    runs each window with its own segment ids: at every document start inside a window the
    state and the conv window restart from zero, so every recorded Δ is what its document
    gives alone from the later of its own start and the window's start. The rule is then
    applied per window, over all of its train_len tokens (docs/design.md, "LongMamba
    calibration", packed streams). A stream of one document is a plain stream.

    Args:
      params: the model.
      tokens: int token ids of ordinary text (any tokenizer's): one stream [n] (or [1, n]),
        or a list of documents, each a 1-D sequence of ids (packed in order; empty ones are
        dropped).
      train_len: the model's training context L_train (window length).
      num_windows: windows taken evenly across the stream (100 as published).
      clamp_top: ρ; Δ is clamped at its k-th largest value, k = max(1, ⌊ρ·train_len⌋).
      aggregate: "mean" (published `avg`) or "max" over windows.
      backend: scan backend for the recording runs.
      batch_size: windows per forward pass.
      progress: show a progress bar over the windows.
      segment_ids: int [n] (or [1, n]), packed documents as in `forward`: a run of equal ids is
        one document, a new one starts where the id changes.
      cu_seqlens: [0, n_1, n_1 + n_2, ..., n], the document boundaries (instead of
        segment_ids).
      storage: "exact" (every channel's sorted curves: what the `alpha` and `offline` rules
        need), "grid" (θ on a grid of lengths: small), or "auto" (exact for small inputs);
        docs/design.md, "LongMamba calibration".

    Returns:
      a `Calibration` matched to this model's config (fingerprint, layers, channels) and
      weights (`weights_digest`).

    Raises:
      ValueError: a stream that is not 1-D integer ids in [0, padded_vocab_size) of at least
        train_len tokens, segment ids that are not one int per token (or cu_seqlens that do
        not run from 0 to the stream's length in increasing steps), documents given both ways
        (all before any work), or bad options. Hybrid models refuse packed streams.
    """
    cfg = params.config
    train_len = check_int("train_len", train_len, minimum=1)
    num_windows = check_int("num_windows", num_windows, minimum=1)
    stream, doc = prepare_stream(params, tokens, train_len, segment_ids, cu_seqlens)
    builder = CalibrationBuilder(layer_A(params), train_len=train_len, num_windows=num_windows,
                                 clamp_top=clamp_top, aggregate=aggregate, storage=storage)
    for dt in _delta_batches(params, stream, doc, train_len=train_len, num_windows=num_windows,
                             backend=backend, batch_size=batch_size, progress=progress):
        builder.add(list(dt))
    return builder.finish(
        fingerprint=cfg.fingerprint,
        weights_digest=weights_digest(params),
        model_info={"arch": cfg.arch, "n_layer": cfg.n_ssm_layer, "channels": cfg.channels,
                    "kind": "channels" if isinstance(cfg, MambaConfig) else "heads"},
    )
