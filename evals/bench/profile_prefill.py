"""Where a whole-model prefill's GPU time goes, ours against the official mamba_ssm stack.

One prefill (batch 1, logits of the last token) of the random mamba2-1.3b- or mamba-1.4b-shaped
model of `model_setup.py`, traced on the device: ours through `jax.profiler` (kernel events of
the GPU plane, read back with `jax.profiler.ProfileData`), the official `MambaLMHeadModel`
through `torch.profiler`. Kernel times are summed by name and by a coarse class (GEMM, scan,
conv, norm, elementwise/other), so the two stacks can be compared class by class.

    python evals/bench/profile_prefill.py --arch mamba2 --length 16384 --out prof.json   # GPU
    python evals/bench/profile_prefill.py --small --arch mamba2 --length 64              # CPU

The official side needs the sources in `--official-src` (see `official.py`) and, for its fused
paths, the extensions `evals/device/build_official.sh` builds; it is skipped with the reason
otherwise.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import jax

from longmamba_evals.bench.common import write_json

# Ordered: the first pattern that matches a kernel name gives its class.
CLASSES = (
    ("gemm", r"gemm|cublas|cutlass|matmul|dot|sm90_xmma|nvjet|wgmma"),
    ("scan", r"ssd|selective_scan|chunk_scan|chunk_state|state_passing|bmm_chunk|cumsum"),
    ("conv", r"conv(?!ert)"),  # conv1d, convolution, causal_conv; not "convert"
    ("norm", r"norm|rms"),
)


def classify(name: str) -> str:
    low = name.lower()
    for cls, pattern in CLASSES:
        if re.search(pattern, low):
            return cls
    return "other"


def summarize(kernels: dict[str, tuple[float, int]], reps: int) -> dict:
    """{name: (total ns, launches)} over `reps` prefills -> per-prefill ms by class and top 25."""
    by_class = collections.Counter()
    for name, (ns, _) in kernels.items():
        by_class[classify(name)] += ns / reps / 1e6
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "total_ms": sum(by_class.values()),
        "by_class_ms": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n[:160], "class": classify(n), "ms": ns / reps / 1e6,
                 "launches": cnt // reps} for n, (ns, cnt) in top],
    }


def fusion_lines(hlo: str, names) -> dict[str, str]:
    """The defining line of each named instruction in an optimized HLO text (its shape, its
    operands and metadata), to tell what a kernel of the profile computes."""
    out = {}
    for name in names:
        # the profiler spells the HLO name "fusion.2" as "fusion_2"
        for cand in (name, re.sub(r"_(\d+)$", r".\1", name)):
            m = re.search(rf"^\s*(?:ROOT )?%?{re.escape(cand)} = .*$", hlo, re.M)
            if m:
                break
        if not m:
            continue
        text = m.group(0).strip()[:600]
        called = re.search(r"calls=%?([\w.\-]+)", m.group(0))
        if called:  # the fused computation's body: what the kernel actually computes
            body = re.search(rf"^%?{re.escape(called.group(1))} .*?^}}", hlo, re.M | re.S)
            if body:
                text += "\n" + re.sub(r", metadata=\{[^}]*\}", "", body.group(0))[:3000]
        out[name] = text
    return out


def profile_ours(arch: str, length: int, small: bool, reps: int, hlo_out=None) -> dict:
    from jax.profiler import ProfileData

    import longmamba_jax as lmj
    from longmamba_evals.bench.model_setup import random_params, random_tokens

    params = random_params(arch, small)
    tokens = random_tokens(1, length, params.config.vocab_size, seed=length)
    run = lambda: jax.block_until_ready(lmj.prefill(params, tokens))
    run()  # compile
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(reps):
            run()
        jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {d}")
        data = ProfileData.from_file(paths[0])
    kernels = collections.defaultdict(lambda: [0.0, 0])
    planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
    line_names = sorted({line.name for p in planes for line in p.lines})
    # stream lines hold the kernels; the derived lines ("XLA Ops", "XLA Modules", ...) would
    # count the same time twice
    streams = [n for n in line_names if "stream" in n.lower()]
    for plane in planes:
        for line in plane.lines:
            if line.name not in streams:
                continue
            for ev in line.events:
                k = kernels[ev.name]
                k[0] += ev.duration_ns
                k[1] += 1
    out = summarize({n: tuple(v) for n, v in kernels.items()}, reps)
    out.update(wall_ms=wall * 1e3, gpu_planes=len(planes), gpu_lines=line_names)
    if hlo_out:  # the optimized HLO, and the definition of each top kernel in it
        hlo = jax.jit(lambda p, t: lmj.prefill(p, t)).lower(params, tokens).compile().as_text()
        with open(hlo_out, "w") as fh:
            fh.write(hlo)
        defs = fusion_lines(hlo, [k["name"] for k in out["top"]])
        for k in out["top"]:
            k["hlo"] = defs.get(k["name"])
    return out


def profile_official(arch: str, length: int, src: str, reps: int) -> dict:
    try:
        import torch

        from longmamba_evals.bench.official import (
            has_causal_conv1d,
            has_selective_scan_cuda,
            import_mamba_ssm,
            official_lm,
        )

        import_mamba_ssm(src)
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401 - fail here
        if not torch.cuda.is_available():
            return {"skipped": "torch sees no CUDA device"}
        if arch == "mamba1" and not has_selective_scan_cuda():
            return {"skipped": "selective_scan_cuda not built"}
    except Exception as err:  # noqa: BLE001 - anything missing means "not here"
        return {"skipped": f"{type(err).__name__}: {err}"}
    conv = has_causal_conv1d()
    model = official_lm(arch, conv)
    ids = torch.randint(0, 50277, (1, length), device="cuda")

    def run():
        with torch.inference_mode():
            model(ids, num_last_tokens=1)
        torch.cuda.synchronize()

    run()
    run()
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    act = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=act) as prof:
        for _ in range(reps):
            run()
    kernels = {}
    for ev in prof.key_averages():
        ns = getattr(ev, "self_device_time_total", None)
        if ns is None:
            ns = getattr(ev, "self_cuda_time_total", 0)
        if ns > 0:
            kernels[ev.key] = (ns * 1e3, ev.count)  # µs -> ns
    out = summarize(kernels, reps)
    out.update(wall_ms=wall * 1e3, causal_conv1d=conv)
    return out


def print_side(title: str, r: dict) -> None:
    if "skipped" in r:
        print(f"{title}: skipped ({r['skipped']})")
        return
    print(f"{title}: wall {r['wall_ms']:.1f} ms, kernels {r['total_ms']:.1f} ms; by class: "
          + ", ".join(f"{k} {v:.1f}" for k, v in r["by_class_ms"].items()))
    for k in r["top"]:
        print(f"  {k['ms']:8.2f} ms {k['launches']:5d}x  {k['class']:5s} {k['name'][:110]}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="mamba2", choices=("mamba2", "mamba1"))
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=2, help="traced prefills (times are per prefill)")
    ap.add_argument("--small", action="store_true", help="tiny model (CPU smoke)")
    ap.add_argument("--official-src", default=os.environ.get("MAMBA_SSM_SRC", ".official"))
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--out", help="write the result as JSON here")
    ap.add_argument("--hlo", help="write our prefill's optimized HLO here, and give each top "
                    "kernel's defining HLO line in the JSON")
    args = ap.parse_args(argv)
    if not args.no_official:  # torch shares the GPU: JAX must not grab 75% of it up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    dev = jax.devices()[0]
    result = {"device": dev.device_kind, "jax": jax.__version__, "arch": args.arch,
              "length": args.length, "command": " ".join(sys.argv)}
    result["ours"] = profile_ours(args.arch, args.length, args.small, args.reps, args.hlo)
    print_side(f"ours ({dev.device_kind}, {args.arch}, L={args.length})", result["ours"])
    if not args.no_official:
        result["official"] = profile_official(args.arch, args.length, args.official_src,
                                              args.reps)
        print_side("official mamba_ssm", result["official"])
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
