"""Public entry point of the Mamba-1 selective scan: one signature, an explicit implementation.

    y, final_state = selective_scan(x, dt, A, B, C, D, implementation="associative")

Implementations: "reference" (sequential lax.scan), "associative" (chunked associative scan, runs
everywhere), "pallas" (GPU kernel; `interpret=True` runs it through the Pallas interpreter on any
platform). Asking for one that cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

from longmamba_kernels.common import check_implementation, filter_threshold
from longmamba_kernels.selective_scan_associative import selective_scan_associative
from longmamba_kernels.selective_scan_reference import selective_scan_reference


def selective_scan(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    *,
    initial_state=None,
    dt_global=None,
    dt_threshold=None,
    implementation: str = "associative",
    interpret: bool = False,
):
    """Mamba-1 selective scan with the LongMamba Δ filter applied inside the scan.

    Args:
      x: [b, l, e] (fp32 or bf16). dt: [b, l, e] Δ after softplus (fp32). A: [e, n] fp32.
      B, C: [b, l, n]. D: [e] or None. initial_state: [b, e, n] fp32 or None.
      dt_global: [e] bool, dt_threshold: [e] fp32 (both or neither): in global channels a token
        with Δ <= threshold gets Δ := 0.
      implementation: "reference" | "associative" | "pallas".
      interpret: run the Pallas kernel in interpret mode (CPU); only for "pallas".

    Returns:
      (y [b, l, e] fp32, final_state [b, e, n] fp32).
    """
    check_implementation(implementation)
    threshold = filter_threshold(dt_global, dt_threshold, x.shape[-1])
    if implementation == "reference":
        return selective_scan_reference(
            x, dt, A, B, C, D, initial_state=initial_state, threshold=threshold
        )
    if implementation == "associative":
        return selective_scan_associative(
            x, dt, A, B, C, D, initial_state=initial_state, threshold=threshold
        )
    from longmamba_kernels.selective_scan_pallas import selective_scan_pallas

    return selective_scan_pallas(
        x, dt, A, B, C, D, initial_state=initial_state, threshold=threshold, interpret=interpret
    )
