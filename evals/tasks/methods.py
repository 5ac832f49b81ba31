"""The methods a task runs: vanilla, LongMamba, DeciMamba, by name and settings."""

from __future__ import annotations

import dataclasses
import os
from functools import lru_cache
from typing import Any

__all__ = ["METHODS", "MethodSpec"]

METHODS = ("vanilla", "longmamba", "decimamba")


def base_name(name: str) -> str:
    """"longmamba-bound" -> "longmamba": LongMamba with a token-selection rule is named
    longmamba-RULE (`longmamba_jax.selection.RULES`)."""
    return name.split("-", 1)[0]


def check_method(name: str) -> str:
    """The method name normalised (longmamba:RULE -> longmamba-RULE); ValueError if unknown."""
    from longmamba_jax.selection import RULES

    name = name.replace(":", "-")
    base, _, rule = name.partition("-")
    if base not in METHODS or (rule and (base != "longmamba" or rule not in RULES)):
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}, or "
                         f"longmamba-RULE with RULE one of {', '.join(RULES)}")
    return name


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method by name plus its settings; `build()` makes the `longmamba_jax` method object.

    DeciMamba's `keep_last` (trailing tokens never dropped: the question, the scored labels) is
    task-specific, so tasks pass it to `build`.

    Attributes:
        name: "vanilla", "longmamba", "longmamba-RULE" (a token-selection rule) or
            "decimamba".
        calibration: LongMamba calibration file (.npz) or a loaded `Calibration`.
        channel_threshold: LongMamba c_thr (global channels have tA_prod > c_thr).
        scale: LongMamba b (Δ kept when Δ > b·θ_S).
        min_len: LongMamba switch-on length (None: the library default, S > L_train).
        decimamba_layers: DeciMamba decimating layers (None: the middle layer).
        L_base: DeciMamba L_base.
        beta: DeciMamba β.
        min_seq_len: DeciMamba min_seq_len.
    """

    name: str = "vanilla"
    calibration: Any = None
    channel_threshold: float = 0.05
    scale: float = 1.0
    min_len: int | None = None
    decimamba_layers: tuple[int, ...] | None = None
    L_base: int = 2000
    beta: float = 0.5
    min_seq_len: int = 20
    rule_k: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "name", check_method(self.name))
        if self.base == "longmamba" and self.calibration is None:
            raise ValueError(f"method {self.name!r} needs a calibration (--calibration FILE)")

    @property
    def base(self) -> str:
        return base_name(self.name)

    @property
    def rule(self) -> str:
        return self.name.partition("-")[2] or "threshold"

    def build(self, n_layer: int | None = None, keep_last: int = 1):
        """Returns the method object for `longmamba_jax.forward/generate` (None for vanilla).

        Args:
            n_layer: the model's layer count (used for the default DeciMamba layer).
            keep_last: DeciMamba's never-dropped trailing tokens.
        """
        if self.name == "vanilla":
            return None
        import longmamba_jax as lm

        if self.base == "longmamba":
            cal = self.calibration
            if isinstance(cal, (str, os.PathLike)):
                cal = _load_calibration(os.fspath(cal))
            return lm.LongMamba(cal, channel_threshold=self.channel_threshold, scale=self.scale,
                                min_len=self.min_len, rule=self.rule, k=self.rule_k)
        layers = self.decimamba_layers
        if layers is None:
            if n_layer is None:
                raise ValueError("decimamba needs --decimamba-layers (or a model to pick one)")
            layers = (n_layer // 2,)
        return lm.DeciMamba(list(layers), self.L_base, beta=self.beta,
                            min_seq_len=self.min_seq_len, keep_last=max(1, int(keep_last)))

    def settings(self) -> dict:
        """The settings that matter for this method, JSON-ready."""
        if self.base == "longmamba":
            cal = self.calibration
            return {"calibration": os.fspath(cal) if isinstance(cal, (str, os.PathLike))
                    else type(cal).__name__, "channel_threshold": self.channel_threshold,
                    "scale": self.scale, "min_len": self.min_len, "rule": self.rule,
                    "k": self.rule_k}
        if self.name == "decimamba":
            return {"layers": None if self.decimamba_layers is None
                    else list(self.decimamba_layers), "L_base": self.L_base, "beta": self.beta,
                    "min_seq_len": self.min_seq_len}
        return {}


@lru_cache(maxsize=4)
def _load_calibration(path: str):
    import longmamba_jax as lm

    if not os.path.exists(path):
        raise FileNotFoundError(f"calibration file {path!r} does not exist")
    calibration_cls = getattr(lm, "Calibration", None)
    if calibration_cls is None:  # not re-exported at the top level (yet)
        from longmamba_jax.calibration.artifact import Calibration as calibration_cls
    return calibration_cls.load(path)
