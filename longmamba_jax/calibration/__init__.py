"""LongMamba calibration ("align targets"): the rule, its storage, the streaming builder, and
recording Δ from a model (docs/design.md, "LongMamba calibration").

    cal = calibrate(params, token_stream, train_len=2000)   # runs the model
    cal.save("cal.npz"); cal = Calibration.load("cal.npz")
"""

from longmamba_jax.calibration.artifact import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Calibration,
    CalibrationError,
)
from longmamba_jax.calibration.builder import CalibrationBuilder
from longmamba_jax.calibration.record import calibrate, layer_A, record_deltas, window_starts

__all__ = [
    "Calibration", "CalibrationBuilder", "CalibrationError", "FORMAT_NAME", "FORMAT_VERSION",
    "calibrate", "layer_A", "record_deltas", "window_starts",
]
