"""The official mamba_ssm stack, imported from its unpacked sources, for same-run comparisons.

A GPU machine without network has torch, triton and einops but not ``mamba_ssm``, and not its
CUDA extensions (``selective_scan_cuda``, ``causal_conv1d``). The Mamba2 path is pure Triton +
torch: the chunked SSD (``mamba_chunk_scan_combined``), the gated RMSNorm and the decode step
(``selective_state_update``) run from the Python sources; ``evals/device/build_official.sh``
builds the forward passes of ``selective_scan_cuda`` and ``causal_conv1d`` into ``<src>/build``
(about 40 s). `import_mamba_ssm` puts the tree (and ``<src>/build``) on ``sys.path`` and, where
``selective_scan_cuda`` was not built, stands in an empty module for it so that
``import mamba_ssm`` succeeds; anything that really calls the extension then fails loudly
(``AttributeError`` on the stand-in), never silently.

Get the sources (the sdists, not wheels) once, on a machine with a package index, and unpack
them into ``.official/`` at the repository root (git-ignored; copy it to the GPU machine):

    # (pip prepares an sdist's metadata: without these it would build the CUDA extensions)
    MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE pip download --no-deps \
        --no-build-isolation --no-binary :all: mamba_ssm==2.3.2.post1 causal_conv1d==1.7.0
    mkdir -p .official
    tar xzf mamba_ssm-2.3.2.post1.tar.gz && mv mamba_ssm-2.3.2.post1/{mamba_ssm,csrc} .official/
    tar xzf causal_conv1d-1.7.0.tar.gz -C .official       # -> .official/causal_conv1d-1.7.0
    # sha256: mamba_ssm 104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028,
    #         causal_conv1d 3202758494eaa7b597ce1c282dfa188889506bfcb92cad3c407d26736bfcd32b

mamba_ssm and causal_conv1d are Apache-2.0 and BSD-3; nothing of either is copied into this
repository.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import jax.numpy as jnp
import numpy as np

from longmamba_evals.bench.timing import time_fn

__all__ = ["DEFAULT_SRC", "OfficialScan", "has_causal_conv1d", "has_selective_scan_cuda",
           "import_mamba_ssm", "official_conv", "official_lm"]

DEFAULT_SRC = os.environ.get("MAMBA_SSM_SRC", ".official")


def import_mamba_ssm(src: str = DEFAULT_SRC):
    """Return the ``mamba_ssm`` package imported from ``src`` (a dir holding ``mamba_ssm/``).

    Raises ImportError naming what is missing (the tree, torch, triton) with how to get it.
    """
    src = os.path.abspath(src)
    if not os.path.isfile(os.path.join(src, "mamba_ssm", "__init__.py")):
        raise ImportError(
            f"no mamba_ssm source tree at {src!r} (expected {src}/mamba_ssm/__init__.py); "
            "see evals/bench/official.py for how to fetch it"
        )
    for dep in ("torch", "triton", "einops"):
        try:
            importlib.import_module(dep)
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ImportError(f"the official mamba_ssm needs {dep!r}: {e}") from e
    build = os.path.join(src, "build")  # evals/device/build_official.sh writes it
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


def has_selective_scan_cuda() -> bool:
    """Whether ``selective_scan_cuda`` is built (not the stand-in `import_mamba_ssm` puts in)."""
    try:
        module = importlib.import_module("selective_scan_cuda")
    except ImportError:
        return False
    return hasattr(module, "fwd")


def official_lm(arch: str, conv_ext: bool):
    """mamba_ssm's `MambaLMHeadModel` with mamba2-1.3b's (`arch` "mamba2") or mamba-1.4b's
    ("mamba1") shapes: random weights (torch seed 0), bf16, on CUDA, in eval mode. Mamba2 blocks
    take the fused path (`use_mem_eff_path`) only with the causal_conv1d extension (`conv_ext`).
    Call `import_mamba_ssm` first."""
    import torch
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    ssm_cfg = ({"layer": "Mamba2", "use_mem_eff_path": conv_ext} if arch == "mamba2"
               else {"layer": "Mamba1"})
    cfg = MambaConfig(d_model=2048, n_layer=48, vocab_size=50277, ssm_cfg=ssm_cfg, rms_norm=True,
                      residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16,
                      tie_embeddings=True)
    torch.manual_seed(0)
    return MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()


def official_conv(src):
    """causal_conv1d_fn, or (None, reason)."""
    try:
        import_mamba_ssm(src)
        import torch
        from causal_conv1d import causal_conv1d_fn
    except Exception as err:  # not on this machine: the column is skipped with the reason
        return None, f"{type(err).__name__}: {err}"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    return causal_conv1d_fn, None


class OfficialScan:
    """An official mamba_ssm kernel on the same (DLPack-shared) inputs as ours: the Triton SSD
    (`op="ssd"`, `mamba_chunk_scan_combined`) or the CUDA selective scan (`op="selective_scan"`,
    `selective_scan_fn`, which needs the extension `evals/device/build_official.sh` builds
    on a GPU machine)."""

    def __init__(self, src, op="ssd"):
        self.fn, self.reason, self.op = None, None, op
        try:
            try:
                import_mamba_ssm(src)
            except ImportError:
                raise
            except Exception as err:  # the package's __init__ (models, Mamba3...) failed:
                print(f"import mamba_ssm failed ({type(err).__name__}: {err}); importing only "
                      "its ops package", flush=True)  # the SSD ops need none of it
                pkg = types.ModuleType("mamba_ssm")
                pkg.__path__ = [os.path.join(os.path.abspath(src), "mamba_ssm")]
                sys.modules["mamba_ssm"] = pkg
            import torch

            if op == "ssd":
                from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as fn
            else:
                import selective_scan_cuda

                if not hasattr(selective_scan_cuda, "fwd"):  # the stand-in: not built
                    raise ImportError("selective_scan_cuda is not built (run "
                                      "evals/device/build_official.sh on a GPU machine)")
                from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn
        except Exception as err:  # ImportError, or the official package failing to import
            self.reason = f"{type(err).__name__}: {err}"
            return
        if not torch.cuda.is_available():
            self.reason = "torch sees no CUDA device"
            return
        self.torch, self.fn = torch, fn

    def to_torch(self, a):
        try:
            return self.torch.from_dlpack(a)
        except Exception:  # no DLPack path: copy through the host (exact, bf16 via fp32)
            t = self.torch.from_numpy(np.asarray(a.astype(jnp.float32)).copy()).cuda()
            return t.to(self.torch.bfloat16 if a.dtype == jnp.bfloat16 else t.dtype)

    def run(self, args, chunk_size=256):
        """(median ms timed like ours, median ms of triton's do_bench, y, final_state) of the
        official kernel on `args` (jax arrays, our layouts; y comes back in ours).

        The selective scan takes its own layout, time last ([b, e, l], [b, n, l]; transposed
        here, outside the timing, as the official Mamba block produces it), and Δ in the input
        dtype (bf16): `ss_inputs` makes Δ bf16-exact, so both kernels see the same numbers."""
        torch = self.torch
        if self.op == "ssd":
            x, dt, A, B, C, D = (self.to_torch(a) for a in args)

            def fn():
                with torch.inference_mode():
                    return self.fn(x, dt, A, B, C, chunk_size=chunk_size, D=D,
                                   return_final_states=True)
        else:
            x, dt, A, B, C, D = args
            u, delta, B, C = (self.to_torch(a).transpose(1, 2).contiguous()
                              for a in (x, dt.astype(x.dtype), B, C))
            A, D = self.to_torch(A), self.to_torch(D)

            def fn():
                with torch.inference_mode():
                    return self.fn(u, delta, A, B, C, D, return_last_state=True)

        sync = lambda _: torch.cuda.synchronize()
        t, _ = time_fn(fn, sync=sync)
        y, state = fn()
        if self.op != "ssd":
            y = y.transpose(1, 2)  # [b, l, e], as ours
        try:  # the number the official repo's own benchmarks report (events, L2 flushed)
            import triton.testing

            t_db = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception:  # do_bench missing or changed: the main number still stands
            t_db = None
        return t * 1e3, t_db, y, state

    def rel_err(self, ours, theirs):
        torch = self.torch
        a, b = self.to_torch(ours).double(), theirs.double()
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
