"""What Triton makes of a scan kernel, without a GPU: layouts, registers, and the instructions
of each loop, from the kernel's own Triton IR compiled for the H100 (sm_90) by `triton`.

    pip install triton==3.6.0        # the version the GPU runs; works on a CPU-only machine
    python evals/bench/triton_sass.py --op selective_scan --config '{"layout": "tile"}'
    python evals/bench/triton_sass.py --op ssd --out ssd_sass    # keeps .ttir/.ttgir/.ptx/.sass
    python evals/bench/triton_sass.py --op ssd --grad --config '{"heads_per_program": 1}'
                                     # the SSD backward's kernels (SSDBackwardConfig fields)

For each Pallas kernel of one call (mamba-1.4b layer for the selective scan: e = 4096, n = 16 or
`--n`; mamba2-1.3b layer for SSD) it prints the registers, stack (spills) and shared memory
that ptxas assigned, Triton's distributed layouts (`#blocked`: which of a tensor's axes sit in a
thread, across lanes, across warps) and, per loop of the SASS, its instruction count and mix.
Dividing a loop's instructions by the state elements one thread handles per iteration gives
instructions per element (docs/kernels.md, "Selective scan (Triton)").

The Triton IR is captured where Pallas builds it (`lower_jaxpr_to_triton_module`, a private jax
function) and compiled by triton's own pipeline. On a GPU XLA compiles the same IR with its
copy of those passes, so the code there can differ in detail (XLA's pipeline does not contract
a·b + c into an FMA); the layouts and the loop structure are the same passes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys


def sass_loops(sass: str):
    """Loops of a `cuobjdump -sass` listing: one (start, end, instruction Counter) per backward
    branch, the Counter keyed by opcode without modifiers ("FFMA", "MUFU", "LDG", ...)."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    pos = {addr: i for i, (addr, _) in enumerate(ins)}
    opcode = lambda t: (t.split()[1] if t.startswith("@") else t.split()[0]).split(".")[0]
    loops = []
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in pos:
            start = int(m.group(1), 16)
            body = ins[pos[start]:i + 1]
            loops.append((start, addr, collections.Counter(opcode(t) for _, t in body)))
    return loops


def capture_triton_ir(op: str, fields: dict, length: int, n: int | None, grad: bool = False):
    """The Triton IR modules (text) of every Pallas kernel in one call of `op` with config
    `fields`, lowered for CUDA on whatever machine this runs on (with `grad`, of its backward)."""
    import jax
    from jax._src.pallas.triton import lowering as triton_lowering
    from jax._src.pallas.triton import pallas_call_registration as registration

    from longmamba_evals.bench.scan import ss_inputs, ssd_inputs

    captured = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        # The benchmark's own inputs (shapes and dtypes only: nothing is allocated).
        if op == "selective_scan":
            from longmamba_kernels.selective_scan import selective_scan_pallas
            from longmamba_kernels.selective_scan.pallas_triton import SelectiveScanPallasConfig

            n = n or 16
            config = SelectiveScanPallasConfig(**fields).resolve(n)
            args, _ = jax.eval_shape(lambda: ss_inputs(length, n=n))
            run = selective_scan_pallas
        else:
            from longmamba_kernels.ssd.pallas_triton import SSDPallasConfig, ssd_pallas

            args, _ = jax.eval_shape(lambda: ssd_inputs(length, n=n or 128))
            run = ssd_pallas
            if grad:
                from longmamba_kernels.ssd.pallas_backward import SSDBackwardConfig

                config = SSDBackwardConfig(**fields)
                forward = lambda *a: ssd_pallas(*a, backward_config=config)[0]
                fn = lambda *a: jax.vjp(forward, *a)[1](jax.numpy.ones(a[0].shape, "float32"))
            else:
                config = SSDPallasConfig(**fields)
        if not grad:
            fn = lambda *a: run(*a, config=config)
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
    if grad:  # the backward's kernels only
        captured = [m for m in captured if "@ssd_bwd" in m]
    return config, captured


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=("selective_scan", "ssd"), default="selective_scan")
    ap.add_argument("--config", default="{}", help="config fields as JSON")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--n", type=int, default=None, help="state size (default: the layer's)")
    ap.add_argument("--out", default=None, help="folder for the .ttir/.ttgir/.ptx/.sass files")
    ap.add_argument("--grad", action="store_true",
                    help="the SSD backward's kernels (--config: SSDBackwardConfig fields)")
    args = ap.parse_args(argv)
    if args.grad and args.op != "ssd":
        ap.error("--grad is for --op ssd")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        sys.exit("triton_sass needs the triton package: pip install triton==3.6.0")
    try:
        fields = json.loads(args.config)
    except json.JSONDecodeError as err:
        ap.error(f"--config is not JSON ({err}): {args.config!r}")
    config, modules = capture_triton_ir(args.op, fields, args.length, args.n, args.grad)
    print(f"{args.op} l={args.length}: {config}; jax lowering, triton {triton.__version__}, "
          "sm_90")
    out = args.out or os.path.join("/tmp", f"triton_sass_{os.getpid()}")
    os.makedirs(out, exist_ok=True)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = lambda *a: subprocess.run((os.path.join(tools, "cuobjdump"),) + a,
                                          capture_output=True, text=True, check=True).stdout
    grad = args.grad
    for i, ttir in enumerate(modules):
        path = os.path.join(out, f"kernel{i}.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        warps = (config.states_num_warps if grad and "@ssd_bwd_states" in ttir
                 else config.num_warps)
        compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=dict(
            num_warps=warps, num_stages=config.num_stages))
        for kind in ("ttgir", "ptx"):
            with open(os.path.join(out, f"kernel{i}.{kind}"), "w") as f:
                f.write(compiled.asm[kind])
        cubin = os.path.join(out, f"kernel{i}.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = cuobjdump("--dump-resource-usage", cubin)
        sass = cuobjdump("-sass", cubin)
        with open(os.path.join(out, f"kernel{i}.sass"), "w") as f:
            f.write(sass)
        name = re.search(r"tt\.func (?:public )?@(\w+)", ttir)
        print(f"\nkernel {i} ({name.group(1) if name else '?'}): "
              + " ".join(re.findall(r"(?:REG|STACK|SHARED|LOCAL):\d+", usage)))
        for line in compiled.asm["ttgir"].splitlines():
            if line.startswith("#blocked"):
                print("  " + line.split(" = ", 1)[1])
        for start, end, counts in sass_loops(sass):
            top = ", ".join(f"{k} {v}" for k, v in counts.most_common(12))
            print(f"  loop {start:#x}-{end:#x}: {sum(counts.values())} instructions ({top})")
    print(f"\nfiles: {out}")


if __name__ == "__main__":
    main()
