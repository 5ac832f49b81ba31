"""End-to-end speed of the whole model: random-weight models with exactly mamba2-1.3b's and
mamba-1.4b's shapes (`model_setup.py`), bf16 parameters, no checkpoint.

Sections (each in its own process: clean peak memory, a crash loses one section; one time
budget; the JSON is rewritten after every section, so a run cut short keeps what finished):
- `ceilings`: copy bandwidth and bf16 matmul rate of this device, for the limit columns;
- `prefill[:ARCH]`: tokens/s at each length, vanilla and LongMamba (`model_prefill.py`);
- `decode[:ARCH]`: tokens/s and ms/step per batch and decode implementation, with the kernel
  census of one step (`model_decode.py`); `stepcheck`: the decode-step kernel vs its reference;
- `longprompt`: `prefill_chunked` of a 1M-token prompt, chunked == one-shot at 128K;
- `flags`: the Mamba2 decode loop under XLA flag variants (`FLAG_VARIANTS`);
- `mamba_ssm`: the official stack on the same shapes (`model_official.py`).
The table gives each number with its physical limit (`model_table.py`).

    python evals/bench/model.py --out model.json                    # on a GPU
    python evals/bench/model.py --small --out model_small.json      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import longmamba_jax as lmj
from longmamba_evals.bench.common import write_json
from longmamba_evals.bench.model_decode import sec_decode, sec_stepcheck
from longmamba_evals.bench.model_official import sec_mamba_ssm
from longmamba_evals.bench.model_prefill import sec_longprompt, sec_prefill
from longmamba_evals.bench.model_setup import CONFIGS, model_config
from longmamba_evals.bench.model_table import table
from longmamba_evals.bench.timing import copy_bandwidth, matmul_rate
from longmamba_evals.tasks.runner import device_name

# name -> XLA_FLAGS added for that variant of the decode measurement (flag values checked in the
# jaxlib of this repo's environment: CommandBufferCmdType and WhileLoopUnrolling enums).
FLAG_VARIANTS = {
    # the while loops (decode loop and layer scan) captured into CUDA graphs with conditional
    # nodes instead of one host round trip per trip
    "cmdbuf_while": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",
    # loops with a known trip count (the 48-layer scan) unrolled by XLA
    "full_unroll": "--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL",
    # no command buffers at all: what the default ones buy
    "no_cmdbuf": "--xla_gpu_enable_command_buffer=",
}
SMALL_LENGTHS = (128, 256)


def sec_ceilings(args) -> dict:
    """Copy bandwidth (`a + 1` over 2 GiB of fp32; 64 MiB small) and matmul rate (bf16 8192²;
    fp32 512² small) of this device."""
    n = (1 << 24) if args.small else (1 << 29)  # fp32 elements: 64 MB / 2 GiB
    m = 512 if args.small else 8192
    dt = jnp.float32 if args.small else jnp.bfloat16
    return {"copy_bytes_per_s": copy_bandwidth(4 * n), "copy_array_bytes": 4 * n,
            "matmul_flops_per_s": matmul_rate(m, dt), "matmul_n": m,
            "matmul_dtype": str(jnp.dtype(dt))}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--small", action="store_true", help="tiny models, short lengths (CPU)")
    p.add_argument("--archs", default="mamba2,mamba1")
    p.add_argument("--backend", default="auto", choices=lmj.BACKENDS)
    p.add_argument("--lengths", default="4096,16384,65536")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--impls", default="scan,unrolled,fused", help="decode implementations")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed prefill runs per variant")
    p.add_argument("--decode-repeats", type=int, default=4,
                   help="decode loops per variant (the first is untimed: compile)")
    p.add_argument("--long-len", type=int, default=1 << 20)
    p.add_argument("--chunk", type=int, default=1 << 16)
    p.add_argument("--eq-len", type=int, default=1 << 17)
    p.add_argument("--flag-variants", default=",".join(FLAG_VARIANTS),
                   help=f"comma-separated names from {sorted(FLAG_VARIANTS)} ('' for none)")
    p.add_argument("--sections", default="ceilings,prefill,decode,longprompt,flags",
                   help="sections to run, in this order (prefill/decode once per arch, or "
                        "prefill:ARCH / decode:ARCH for one; "
                        "stepcheck, longprompt, flags for mamba2; mamba_ssm: the official "
                        "stack, also added by --compare-mamba-ssm)")
    p.add_argument("--compare-mamba-ssm", action="store_true",
                   help="add the 'mamba_ssm' section (the official stack, same shapes)")
    p.add_argument("--official-src", default=".official",
                   help="folder holding the unpacked mamba_ssm sources (official.py)")
    p.add_argument("--hlo-stats", action="store_true",
                   help="count loops/copies/slices in the optimized decode HLO (+ --dump-dir)")
    p.add_argument("--dump-dir", default=None, help="write the optimized decode HLO here")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="stop starting sections after this many seconds")
    p.add_argument("--section-timeout-s", type=float, default=240.0)
    p.add_argument("--cache-dir", default="/tmp/longmamba_bench_jax_cache",
                   help="persistent compilation cache of the worker processes")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def _finish_args(args):
    args.archs = [a for a in args.archs.split(",") if a]
    args.impls = [a for a in args.impls.split(",") if a]
    if args.small:
        args.lengths, args.batches = list(SMALL_LENGTHS), [1, 2]
        args.prompt_len, args.new_tokens, args.repeats, args.decode_repeats = 64, 12, 2, 3
        args.long_len, args.chunk, args.eq_len = 1000, 256, 600
    else:
        args.lengths = [int(x) for x in args.lengths.split(",") if x]
        args.batches = [int(x) for x in args.batches.split(",") if x]
    return args


def _worker(args) -> dict:
    kind, _, arch = args.worker.partition(":")
    if kind == "ceilings":
        return sec_ceilings(args)
    if kind == "prefill":
        return sec_prefill(args, arch)
    if kind == "decode":
        return sec_decode(args, arch)
    if kind == "longprompt":
        return sec_longprompt(args)
    if kind == "mamba_ssm":
        return sec_mamba_ssm(args)
    if kind == "stepcheck":
        return sec_stepcheck(args)
    raise ValueError(f"unknown worker section {args.worker!r}")


def _run_section(name: str, argv: list[str], env_flags: str, timeout: float, out_dir: str):
    part = os.path.join(out_dir, f"part_{name.replace(':', '_').replace('@', '_')}.json")
    env = dict(os.environ)
    if env_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + env_flags).strip()
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker",
           name.split("@")[0], "--worker-out", part]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        log, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        log, rc = out if isinstance(out, str) else out.decode(errors="replace"), "timeout"
    wall = time.perf_counter() - t0
    sys.stdout.write(log)
    sys.stdout.flush()
    if rc == 0 and os.path.exists(part):
        with open(part) as f:
            res = json.load(f)
    else:
        res = {"error": f"exit {rc}", "log_tail": log[-3000:]}
    res["wall_s"] = wall
    return res


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _finish_args(_parser().parse_args(argv))
    if args.worker:
        # Programs compiled by the call path are found again by the memory analysis' AOT
        # compile (and by later sections) in this on-disk cache; compile times are first
        # compiles (the cache starts empty on a fresh machine; flag variants have other keys).
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        res = _worker(args)
        write_json(args.worker_out, res)
        return res

    t_start = time.perf_counter()
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else "/tmp"
    if args.dump_dir:
        os.makedirs(args.dump_dir, exist_ok=True)
    result = {"device": device_name(), "jax": jax.__version__, "longmamba_jax": lmj.__version__,
              "python": platform.python_version(), "small": args.small,
              "backend": args.backend, "resolved_backend": str(lmj.resolve_backend(args.backend)),
              "configs": {a: model_config(a, args.small).to_dict() for a in args.archs},
              "argv": argv, "sections": {}}
    plan: list[tuple[str, str]] = []  # (section name, extra XLA flags), in --sections order
    wanted = [w for w in args.sections.split(",") if w]
    if args.compare_mamba_ssm and "mamba_ssm" not in wanted:
        wanted.append("mamba_ssm")
    for sec in wanted:
        if sec in ("ceilings", "mamba_ssm"):
            plan.append((sec, ""))
        elif sec in ("prefill", "decode"):
            plan += [(f"{sec}:{arch}", "") for arch in args.archs]
        elif sec.partition(":")[0] in ("prefill", "decode") and sec.partition(":")[2] in CONFIGS:
            plan.append((sec, ""))  # one arch at this place in the order
        elif sec in ("stepcheck", "longprompt") and "mamba2" in args.archs:
            plan.append((sec, ""))
        elif sec == "flags" and "mamba2" in args.archs:
            for v in (v for v in args.flag_variants.split(",") if v):
                plan.append((f"decode:mamba2@{v}", FLAG_VARIANTS[v]))
        elif sec not in ("stepcheck", "longprompt", "flags"):
            raise ValueError(f"unknown section {sec!r} in --sections")

    for name, flags in plan:
        elapsed = time.perf_counter() - t_start
        left = args.budget_s - elapsed
        if left < 20:
            result["sections"][name] = {"skipped": f"time budget ({elapsed:.0f} s used)"}
            print(f"== {name}: skipped (budget)", flush=True)
            continue
        print(f"== {name} {flags} (t={elapsed:.0f} s)", flush=True)
        sub_argv = list(argv)
        if "@" in name:  # flag variants: batch 1 only
            sub_argv += ["--batches", "1"]
        result["sections"][name] = _run_section(
            name, sub_argv, flags, min(args.section_timeout_s, left), out_dir)
        if args.out:
            write_json(args.out, result)
    result["total_s"] = time.perf_counter() - t_start
    print()
    ceil = result["sections"].get("ceilings", {})
    if "copy_bytes_per_s" in ceil:
        print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e9:,.0f} GB/s, matmul "
              f"{ceil['matmul_flops_per_s'] / 1e12:,.1f} TFLOP/s ({ceil['matmul_dtype']})")
    print(table(result))
    lp = result["sections"].get("longprompt", {})
    for k, v in lp.items():
        if isinstance(v, dict):
            print(f"{k}: {json.dumps(v, default=str)}")
    if args.out:
        write_json(args.out, result)
        print(f"\nsaved {args.out} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
