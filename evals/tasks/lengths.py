"""Context lengths on the command line ("4k,16k" -> [4000, 16000]) and as short labels."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np


def parse_lengths(spec: str | Sequence[int | str], *, k: int = 1_000) -> list[int]:
    """Parses context lengths: "1k,2k,4096" -> [1000, 2000, 4096] (m = k²).

    Args:
        spec: a comma-separated string, or a sequence of ints / strings.
        k: what the suffix k (or K) means: 1,000 for the evaluations, 1,024 for the kernel
            benchmarks ("16K" = 16,384).

    Returns:
        The lengths in the given order.

    Raises:
        ValueError: on an empty spec, a malformed item or a length < 1.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, (int, np.integer)):
            value = int(item)
        else:
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(item))
            if m is None:
                raise ValueError(f"bad length {item!r}: use an integer or e.g. '4k', '1.5k', '1m'")
            scale = {"": 1, "k": k, "m": k * k}[m.group(2).lower()]
            value_f = float(m.group(1)) * scale
            if value_f != int(value_f):
                raise ValueError(f"bad length {item!r}: not a whole number of tokens")
            value = int(value_f)
        if value < 1:
            raise ValueError(f"bad length {item!r}: must be >= 1")
        out.append(value)
    if not out:
        raise ValueError(f"no lengths given in {spec!r}")
    return out


def short_length(x: float) -> str:
    """4000 -> "4k", 1500 -> "1.5k", 500 -> "500", 2000000 -> "2m"."""
    if x >= 1_000_000 and x % 100_000 == 0:
        return f"{x / 1_000_000:g}m"
    if x >= 1000 and x % 100 == 0:
        return f"{x / 1000:g}k"
    return f"{x:g}"
