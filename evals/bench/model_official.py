"""The official mamba_ssm stack in the whole-model benchmark: `MambaLMHeadModel` on the same
shapes in the same run, prefill at each length and decode with its CUDA graphs."""

from __future__ import annotations

import statistics
import time

from longmamba_evals.bench.official import (
    has_causal_conv1d,
    has_selective_scan_cuda,
    import_mamba_ssm,
    official_lm,
)
from longmamba_evals.bench.timing import timed

__all__ = ["sec_mamba_ssm"]


def sec_mamba_ssm(args) -> dict:
    """The official stack on the same shapes, in the same run: mamba_ssm's `MambaLMHeadModel`
    (random weights, bf16, CUDA) from the unpacked sources in `--official-src`
    (`official.import_mamba_ssm`). Prefill at each length (batch 1, `num_last_tokens=1`)
    and decode at each batch after a `--prompt-len` prompt with its CUDA-graph decoding
    (`generate(..., cg=True)`). Without the causal_conv1d extension its Mamba2 blocks run with
    `use_mem_eff_path=False` (the fused path calls causal_conv1d): torch conv1d, Triton SSD
    (`mamba_chunk_scan_combined`), Triton gated RMSNorm and `selective_state_update`. Mamba-1
    needs the `selective_scan_cuda` extension: skipped without it."""
    try:
        import torch

        mamba_ssm = import_mamba_ssm(args.official_src)
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401 - fail here
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        msg = f"mamba_ssm not importable here ({type(exc).__name__}: {exc}); section skipped"
        print(msg, flush=True)
        return {"skipped": msg}
    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device; section skipped"}
    conv_ext = has_causal_conv1d()
    out = {"mamba_ssm_version": getattr(mamba_ssm, "__version__", "?"),
           "torch": torch.__version__, "device": torch.cuda.get_device_name(),
           "causal_conv1d": conv_ext, "use_mem_eff_path": conv_ext, "rows": []}
    print(f"mamba_ssm {out}", flush=True)
    for arch in args.archs:
        if arch == "mamba1" and not has_selective_scan_cuda():
            out["rows"].append({"arch": arch, "skipped": "selective_scan_cuda not built"})
            continue
        out["rows"] += _mamba_ssm_arch(args, arch, torch, conv_ext)
        torch.cuda.empty_cache()
    return out


def _torch_timed(torch, fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn() after one untimed call, each synchronized."""
    return statistics.median(timed(fn, repeats, sync=lambda _: torch.cuda.synchronize())[1])


def _mamba_ssm_arch(args, arch, torch, conv_ext) -> list[dict]:
    model = official_lm(arch, conv_ext)
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, 50277, (1, length), device="cuda")
        try:
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.inference_mode():
                t = _torch_timed(torch, lambda i=ids: model(i, num_last_tokens=1), args.repeats)
            row = {"kind": "prefill", "arch": arch, "length": length, "batch": 1, "median_s": t,
                   "tokens_per_s": length / t,
                   "compile_s": max(time.perf_counter() - t0 - (args.repeats + 1) * t, 0.0),
                   "peak_bytes": torch.cuda.max_memory_allocated()}
        except Exception as exc:  # noqa: BLE001 - record and go on (e.g. index overflow)
            row = {"kind": "prefill", "arch": arch, "length": length, "error": repr(exc)[:500]}
        rows.append(row)
        print(f"mamba_ssm {row}", flush=True)
    n = args.new_tokens
    for batch in args.batches:
        ids = torch.randint(0, 50277, (batch, args.prompt_len), device="cuda")

        def gen(m, ids=ids):
            return model.generate(input_ids=ids, max_length=args.prompt_len + m, cg=True)

        try:
            with torch.inference_mode():
                # step time = (n tokens − 1 token) / (n − 1): prefill and graph capture cancel
                # (gen(1) reuses the graphs captured for the longer max_length)
                t_full = _torch_timed(torch, lambda: gen(n), 3)
                t_one = _torch_timed(torch, lambda: gen(1), 3)
            steps = n - 1
            row = {"kind": "decode", "arch": arch, "batch": batch, "prompt_len": args.prompt_len,
                   "new_tokens": n, "step_ms": 1e3 * (t_full - t_one) / steps,
                   "tokens_per_s": batch * steps / (t_full - t_one), "cuda_graphs": True}
        except Exception as exc:  # noqa: BLE001
            row = {"kind": "decode", "arch": arch, "batch": batch, "error": repr(exc)[:500]}
        rows.append(row)
        print(f"mamba_ssm {row}", flush=True)
    return rows
