"""Public entry point of the Mamba2 SSD scan: one signature, an explicit implementation.

    y, final_state = ssd(x, dt, A, B, C, D, chunk_size=256, implementation="associative")

Implementations: "reference" (sequential lax.scan), "associative" (chunked SSD in jnp, runs
everywhere), "pallas" (GPU kernel; `interpret=True` runs it through the Pallas interpreter on any
platform). Asking for one that cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

from longmamba_kernels.common import check_implementation, check_segment_ids, filter_threshold
from longmamba_kernels.ssd.chunked import ssd_chunked
from longmamba_kernels.ssd.reference import ssd_reference


def ssd(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    *,
    chunk_size: int = 256,
    initial_state=None,
    dt_global=None,
    dt_threshold=None,
    segment_ids=None,
    implementation: str = "associative",
    interpret: bool = False,
):
    """Mamba2 SSD scan with the LongMamba Δ filter applied inside the scan.

    Args:
      x: [b, l, h, p] (fp32 or bf16). dt: [b, l, h] Δ after softplus and dt_limit (fp32).
      A: [h] fp32. B, C: [b, l, g, n]. D: [h] or None. initial_state: [b, h, p, n] or None.
      chunk_size: tokens per chunk ("associative"; the Pallas kernel picks its own blocks).
      dt_global: [h] bool, dt_threshold: [h] fp32 (both or neither).
      segment_ids: [b, l] int or None: packed documents; where the id changes, the state
        starts from zero (the first document continues initial_state; the final state is the
        last document's).
      implementation: "reference" | "associative" | "pallas".
      interpret: run the Pallas kernel in interpret mode (CPU); only for "pallas".

    Returns:
      (y [b, l, h, p] fp32, final_state [b, h, p, n] fp32).
    """
    check_implementation(implementation)
    threshold = filter_threshold(dt_global, dt_threshold, x.shape[2])
    segment_ids = check_segment_ids(segment_ids, x.shape[0], x.shape[1])
    if implementation == "reference":
        return ssd_reference(x, dt, A, B, C, D, initial_state=initial_state, threshold=threshold,
                             segment_ids=segment_ids)
    if implementation == "associative":
        return ssd_chunked(
            x, dt, A, B, C, D, initial_state=initial_state, threshold=threshold,
            chunk_size=chunk_size, segment_ids=segment_ids,
        )
    from longmamba_kernels.ssd.pallas_triton import ssd_pallas

    return ssd_pallas(x, dt, A, B, C, D, initial_state=initial_state, threshold=threshold,
                      segment_ids=segment_ids, interpret=interpret)
