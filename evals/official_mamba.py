"""Import the official ``mamba_ssm`` from an unpacked source tree, for same-run comparisons.

The GPU machine has torch, triton and einops but not ``mamba_ssm`` (no network there), and
its CUDA extensions (``selective_scan_cuda``, ``causal_conv1d``) are not built there. The
Mamba2 path is pure Triton + torch: the chunked SSD (``mamba_chunk_scan_combined``), the gated
RMSNorm and the decode step (``selective_state_update``) all run from the Python sources.
``evals/build_official_extensions.sh`` builds the forward passes of ``selective_scan_cuda``
and ``causal_conv1d`` there, into ``<src>/build``, in about 40 s.
This module puts the tree (and ``<src>/build``) on ``sys.path`` and, where
``selective_scan_cuda`` was not built, stands in an empty module for it so that
``import mamba_ssm`` succeeds; anything that really calls the CUDA extension then fails loudly
(``AttributeError`` on the stand-in), never silently.

Fetch the sources once on a machine with the package index (the sdist, not a wheel):

    mkdir -p .official && cd .official
    H=af/48/aa7bec0efc7453fa0512276c0069c854bf684219050294266534bfef34bb
    curl -sO https://files.pythonhosted.org/packages/$H/mamba_ssm-2.3.2.post1.tar.gz
    tar xzf mamba_ssm-2.3.2.post1.tar.gz && mv mamba_ssm-2.3.2.post1/{mamba_ssm,csrc} .
    rm -r mamba_ssm-2.3.2.post1*
    # the sdist's sha256: 104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028
    H=f4/d1/eba27735f31bd5527d39a3c7f693e6ded7b844cab275db719a15ad37b6cd
    curl -sO https://files.pythonhosted.org/packages/$H/causal_conv1d-1.7.0.tar.gz
    tar xzf causal_conv1d-1.7.0.tar.gz && rm causal_conv1d-1.7.0.tar.gz
    # the sdist's sha256: 3202758494eaa7b597ce1c282dfa188889506bfcb92cad3c407d26736bfcd32b

(``.official/`` is ignored by git; name it in the device tool's ``carry``.) mamba_ssm and
causal_conv1d are Apache-2.0 and BSD-3; nothing of either is copied into this repository.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

DEFAULT_SRC = os.environ.get("MAMBA_SSM_SRC", ".official")


def import_mamba_ssm(src: str = DEFAULT_SRC):
    """Return the ``mamba_ssm`` package imported from ``src`` (a dir holding ``mamba_ssm/``).

    Raises ImportError naming what is missing (the tree, torch, triton) with how to get it.
    """
    src = os.path.abspath(src)
    if not os.path.isfile(os.path.join(src, "mamba_ssm", "__init__.py")):
        raise ImportError(
            f"no mamba_ssm source tree at {src!r} (expected {src}/mamba_ssm/__init__.py); "
            "see evals/official_mamba.py for how to fetch it"
        )
    for dep in ("torch", "triton", "einops"):
        try:
            importlib.import_module(dep)
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ImportError(f"the official mamba_ssm needs {dep!r}: {e}") from e
    build = os.path.join(src, "build")  # evals/build_official_extensions.sh writes it
    if os.path.isdir(build) and build not in sys.path:
        sys.path.insert(0, build)
    try:
        importlib.import_module("selective_scan_cuda")
    except ImportError:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    if src not in sys.path:
        sys.path.insert(0, src)
    return importlib.import_module("mamba_ssm")


def has_causal_conv1d() -> bool:
    """Whether the ``causal_conv1d`` CUDA extension is importable (else mamba_ssm falls back
    to torch's conv1d)."""
    try:
        importlib.import_module("causal_conv1d")
    except ImportError:
        return False
    return True
