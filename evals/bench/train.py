"""Training speed: one layer's scan forward + backward, and a whole training step, ours against
mamba_ssm with torch autograd.

    python evals/bench/train.py --out train.json                       # ours, on a GPU
    JAX_PLATFORMS=cpu python evals/bench/train.py --impl official \\
        --out train_official.json                                      # mamba_ssm (torch CUDA)
    python evals/bench/train.py --quick --out smoke.json               # smoke run on CPU

Layers (batch 1; `--layer-lengths`, default 4K, 16K, 64K): the mamba2-1.3b SSD layer (h 64,
p 64, n 128, g 1, chunk 256; x/B/C/y bf16, Δ fp32) through `ssd_pallas` against
`mamba_chunk_scan_combined`, and the mamba-1.4b selective scan (e 4096, n 16) through
`selective_scan_pallas` against `selective_scan_fn`; each call is the forward and the vector-
Jacobian product of a random cotangent of y (all inputs' gradients).

Training step (`--step-lengths`, default 4K, 16K, batch 1) of the 1.3B-shaped models of
`model_setup` (both architectures): ours is `longmamba_jax.training.make_train_step` (fp32
master weights, bf16 compute, AdamW, `--remat`, backend `--backend`); mamba_ssm's is
`MambaLMHeadModel` in fp32 under `torch.autocast(bfloat16)`, loss.backward(), AdamW. Reported:
median step seconds, tokens/s, peak memory (ours: XLA's plan of the step, arguments + outputs +
temporaries, and the process peak; theirs: `torch.cuda.max_memory_allocated`).

The two implementations run in separate processes (`--impl`), so neither allocator holds the
GPU the other needs; `--merge` joins the JSON files and prints the table. `--budget-s` skips what
would start after the budget is spent (recorded as skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from longmamba_evals.bench.common import K, lengths, parse_fields, write_json
from longmamba_evals.bench.timing import time_fn, timed

__all__ = ["main"]

SSD_SHAPE = dict(h=64, p=64, n=128, g=1, chunk=256)
SS_SHAPE = dict(e=4096, n=16)
QUICK_SSD = dict(h=4, p=16, n=16, g=1, chunk=16)
QUICK_SS = dict(e=16, n=8)
# --remat: what `make_train_step(remat=...)` gets
REMAT = {"layer": "layer", "none": None,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class Budget:
    def __init__(self, seconds: float | None):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> bool:
        return self.seconds is None or time.perf_counter() - self.t0 < self.seconds


def _layer_inputs(op, length, shape, seed=0):
    k = jax.random.split(jax.random.key(seed), 7)
    bf16 = jnp.bfloat16
    if op == "ssd":
        h, p, n, g = shape["h"], shape["p"], shape["n"], shape["g"]
        x = jax.random.normal(k[0], (1, length, h, p), bf16)
        dt = jax.nn.softplus(jax.random.normal(k[1], (1, length, h)) - 2.0)
        A = -jnp.exp(jax.random.uniform(k[2], (h,), minval=0.0, maxval=2.7))
        B = jax.random.normal(k[3], (1, length, g, n), bf16)
        C = jax.random.normal(k[4], (1, length, g, n), bf16)
        D = jax.random.normal(k[5], (h,))
        dy = jax.random.normal(k[6], x.shape, bf16)
    else:
        e, n = shape["e"], shape["n"]
        x = jax.random.normal(k[0], (1, length, e), bf16)
        # Δ bf16-exact: the official kernel takes it in the input dtype
        dt = jax.nn.softplus(jax.random.normal(k[1], (1, length, e)) - 2.0)
        dt = dt.astype(bf16).astype(jnp.float32)
        A = -jnp.exp(jax.random.uniform(k[2], (e, n), minval=0.0, maxval=2.7))
        B = jax.random.normal(k[3], (1, length, n), bf16)
        C = jax.random.normal(k[4], (1, length, n), bf16)
        D = jax.random.normal(k[5], (e,))
        dy = jax.random.normal(k[6], x.shape, bf16)
    return (x, dt, A, B, C, D), dy


def _our_layer_fn(op, interpret, quick, chunk, backward_fields=None):
    if op == "ssd":
        from longmamba_kernels.ssd.pallas_backward import SSDBackwardConfig
        from longmamba_kernels.ssd.pallas_triton import SSDPallasConfig, ssd_pallas

        # the model's own kernel blocks (the defaults; the Pallas chunk is not the model's
        # chunk_size: a 256-token chunk needs more shared memory than an H100/H200 has)
        kw = {} if not quick else dict(
            config=SSDPallasConfig(chunk=16, block_p=16),
            backward_config=SSDBackwardConfig(chunk=16, block_p=16, states_block_p=16,
                                              block_n=16))
        if backward_fields:  # a variant of the backward blocks (--ssd-backward-variants)
            base = kw.get("backward_config", SSDBackwardConfig())
            kw["backward_config"] = dataclasses.replace(base, **backward_fields)
        return lambda *a: ssd_pallas(*a, interpret=interpret, y_dtype=jnp.bfloat16, **kw)[0]
    from longmamba_kernels.selective_scan import selective_scan_pallas
    from longmamba_kernels.selective_scan.pallas_backward import SelectiveScanBackwardConfig
    from longmamba_kernels.selective_scan.pallas_triton import SelectiveScanPallasConfig

    kw = {} if not quick else dict(
        config=SelectiveScanPallasConfig(block_e=8, block_t=2, segments=3),
        backward_config=SelectiveScanBackwardConfig(block_e=8, block_t=2, segment=8))
    return lambda *a: selective_scan_pallas(*a, interpret=interpret, out_dtype=jnp.bfloat16,
                                            **kw)[0]


def ours_layers(args, budget, rows):
    ssd_shape = QUICK_SSD if args.quick else SSD_SHAPE
    variants = [(f"ssd[{v}]", ssd_shape, parse_fields(v))
                for v in args.ssd_backward_variants.split(";") if v]
    for op, shape, fields in [("ssd", ssd_shape, None),
                              ("selective_scan", QUICK_SS if args.quick else SS_SHAPE, None),
                              *variants]:
        fn = _our_layer_fn(op.split("[")[0], args.interpret, args.quick,
                           shape.get("chunk", 256), fields)

        @jax.jit
        def fwd_bwd(inputs, dy, fn=fn):
            _, vjp = jax.vjp(fn, *inputs)
            return vjp(dy)

        fwd = jax.jit(lambda inputs, fn=fn: fn(*inputs))
        for length in args.layer_lengths:
            row = {"section": "layer", "impl": "ours", "op": op, "length": length, **shape}
            if not budget.left():
                rows.append({**row, "skipped": "time budget spent"})
                continue
            try:
                inputs, dy = _layer_inputs(op.split("[")[0], length, shape)
                t, _ = time_fn(fwd_bwd, inputs, dy, reps=args.reps, batches=3)
                tf, _ = time_fn(fwd, inputs, reps=args.reps, batches=3)
                grads = fwd_bwd(inputs, dy)
                ok = all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
                row.update(fwd_bwd_ms=1e3 * t, fwd_ms=1e3 * tf, finite=ok)
            except Exception as exc:  # noqa: BLE001 - record and go on (e.g. out of memory)
                row["error"] = repr(exc)[:500]
            rows.append(row)
            args.emit(row)


def ours_steps(args, budget, rows):
    import optax

    import longmamba_jax as lmj
    from longmamba_evals.bench.model_setup import model_config, peak_bytes
    from longmamba_jax import training

    for arch in args.archs:
        config = model_config(arch, args.quick)
        optimizer = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)
        step = training.make_train_step(config, optimizer, backend=args.backend,
                                        compute_dtype="bfloat16", remat=REMAT[args.remat])
        state = None
        for length in args.step_lengths:
            row = {"section": "step", "impl": "ours", "arch": arch, "length": length,
                   "batch": 1, "backend": args.backend, "remat": args.remat}
            if not budget.left():
                rows.append({**row, "skipped": "time budget spent"})
                continue
            try:
                if state is None:
                    params = jax.jit(lambda c=config: lmj.init_params(c, 0, jnp.float32))()
                    state = jax.block_until_ready(training.init_train_state(params,
                                                                            optimizer))
                    del params
                tokens = jnp.asarray(np.random.default_rng(length).integers(
                    0, config.vocab_size, (1, length)), jnp.int32)
                batch = {"tokens": tokens}
                t0 = time.perf_counter()
                compiled = step.lower(state, batch).compile()
                row["compile_s"] = time.perf_counter() - t0
                row["plan_bytes"] = _plan_bytes(compiled)
                holder = {"state": state}

                def one(holder=holder, batch=batch, compiled=compiled):
                    holder["state"], metrics = compiled(holder["state"], batch)
                    return metrics["loss"]

                _, times = timed(one, args.step_reps)
                t = statistics.median(times)
                row.update(step_s=t, tokens_per_s=length / t, loss=float(one()),
                           peak_bytes=peak_bytes())
                state = holder["state"]
            except Exception as exc:  # noqa: BLE001
                row["error"] = repr(exc)[:500]
                state = None  # donated or lost: rebuilt for the next length
            rows.append(row)
            args.emit(row)
        del state


def _plan_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries − donated aliases of a compiled program."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - an optional column
        return None


def official_layers(args, budget, rows):
    import torch

    from longmamba_evals.bench.official import import_mamba_ssm

    fns, reason = {}, ""
    try:
        import_mamba_ssm(args.official_src)
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        fns["ssd"] = mamba_chunk_scan_combined
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        fns["selective_scan"] = selective_scan_fn
    except Exception as exc:  # noqa: BLE001 - recorded per row
        reason = f"{type(exc).__name__}: {exc}"
    for op, shape in (("ssd", SSD_SHAPE), ("selective_scan", SS_SHAPE)):
        for length in args.layer_lengths:
            row = {"section": "layer", "impl": "mamba_ssm", "op": op, "length": length, **shape}
            if op not in fns:
                rows.append({**row, "skipped": reason})
                continue
            if not budget.left():
                rows.append({**row, "skipped": "time budget spent"})
                continue
            try:
                fn = _official_layer(torch, fns[op], op, length, shape)
                sync = lambda _: torch.cuda.synchronize()
                t, _ = time_fn(fn, reps=args.reps, batches=3, sync=sync)
                row.update(fwd_bwd_ms=1e3 * t)
            except Exception as exc:  # noqa: BLE001 - e.g. a backward the build left out
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            rows.append(row)
            args.emit(row)
            torch.cuda.empty_cache()


def _official_layer(torch, fn, op, length, shape):
    """fn(): the official op's forward and the gradients of all inputs for a random dy."""
    g = torch.Generator(device="cuda").manual_seed(0)
    bf16, f32 = torch.bfloat16, torch.float32

    def rand(*s, dtype=bf16):
        return torch.randn(*s, device="cuda", generator=g, dtype=f32).to(dtype)

    if op == "ssd":
        h, p, n, gr = shape["h"], shape["p"], shape["n"], shape["g"]
        x, B, C = rand(1, length, h, p), rand(1, length, gr, n), rand(1, length, gr, n)
        dt = torch.nn.functional.softplus(rand(1, length, h, dtype=f32) - 2.0)
        A = -torch.exp(2.7 * torch.rand(h, device="cuda", generator=g))
        D = rand(h, dtype=f32)
        inputs = [t.requires_grad_() for t in (x, dt, A, B, C, D)]
        dy = rand(1, length, h, p)

        def call():
            y = fn(*inputs[:5], chunk_size=shape["chunk"], D=inputs[5])
            return torch.autograd.grad(y, inputs, dy)
    else:
        e, n = shape["e"], shape["n"]
        u, B, C = rand(1, e, length), rand(1, n, length), rand(1, n, length)
        delta = torch.nn.functional.softplus(rand(1, e, length, dtype=f32) - 2.0).to(bf16)
        A = -torch.exp(2.7 * torch.rand(e, n, device="cuda", generator=g))
        D = rand(e, dtype=f32)
        inputs = [t.requires_grad_() for t in (u, delta, A, B, C, D)]
        dy = rand(1, e, length)

        def call():
            y = fn(*inputs)
            return torch.autograd.grad(y, inputs, dy)
    return call


def official_steps(args, budget, rows):
    import torch

    from longmamba_evals.bench.official import import_mamba_ssm

    try:
        mamba_ssm = import_mamba_ssm(args.official_src)
        import mamba_ssm.modules.mamba2 as m2
        import mamba_ssm.modules.mamba_simple as m1
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except Exception as exc:  # noqa: BLE001
        reason = f"{type(exc).__name__}: {exc}"
        rows += [{"section": "step", "impl": "mamba_ssm", "arch": a, "skipped": reason}
                 for a in args.archs]
        return
    # build_official.sh with BACKWARD=1 builds the backward passes (it leaves a marker): then
    # mamba_ssm runs its fused training paths as shipped. A forward-only build has no conv
    # backward: torch's conv1d and Mamba2's unfused path instead (Mamba-1 then reports the
    # scan's missing backward as its error).
    fused = os.path.exists(os.path.join(args.official_src, "build", "backward"))
    if not fused:
        m2.causal_conv1d_fn = m1.causal_conv1d_fn = None
    print(f"mamba_ssm {getattr(mamba_ssm, '__version__', '?')}, torch {torch.__version__}, "
          f"{'fused training paths' if fused else 'forward-only build: unfused paths'}",
          flush=True)
    for arch in args.archs:
        ssm_cfg = ({"layer": "Mamba2", "use_mem_eff_path": fused} if arch == "mamba2"
                   else {"layer": "Mamba1", "use_fast_path": fused})
        model = optimizer = None
        for length in args.step_lengths:
            row = {"section": "step", "impl": "mamba_ssm", "arch": arch, "length": length,
                   "batch": 1, "autocast": "bfloat16", "weights": "float32", "fused": fused}
            if not budget.left():
                rows.append({**row, "skipped": "time budget spent"})
                continue
            try:
                if model is None:
                    cfg = MambaConfig(d_model=2048, n_layer=48, vocab_size=50277,
                                      ssm_cfg=ssm_cfg, rms_norm=True, residual_in_fp32=True,
                                      fused_add_norm=True, pad_vocab_size_multiple=16,
                                      tie_embeddings=True)
                    torch.manual_seed(0)
                    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.float32).train()
                    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4,
                                                  betas=(0.9, 0.95), weight_decay=0.1)
                ids = torch.randint(0, 50277, (1, length), device="cuda")

                def one(ids=ids, model=model, optimizer=optimizer):
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        logits = model(ids).logits
                    loss = torch.nn.functional.cross_entropy(
                        logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    return loss

                torch.cuda.reset_peak_memory_stats()
                first, times = timed(one, args.step_reps,
                                     sync=lambda _: torch.cuda.synchronize())
                t = statistics.median(times)
                row.update(step_s=t, tokens_per_s=length / t, compile_s=max(first - t, 0.0),
                           peak_bytes=torch.cuda.max_memory_allocated())
            except Exception as exc:  # noqa: BLE001 - e.g. selective_scan_cuda's backward
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                model = optimizer = None
            rows.append(row)
            args.emit(row)
            torch.cuda.empty_cache()
        del model, optimizer
        torch.cuda.empty_cache()


def table(rows) -> str:
    """Markdown tables of the rows (ours and mamba_ssm side by side)."""
    def get(section, impl, key, **match):
        for r in rows:
            if (r.get("section") == section and r.get("impl") == impl
                    and all(r.get(k) == v for k, v in match.items())):
                return r.get(key, r.get("error", r.get("skipped")))
        return None

    def size(length):
        return f"{length // K}K" if length % K == 0 else str(length)

    def fmt(v, scale=1.0, digits=2):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{v * scale:.{digits}f}"
        return "—" if v is None else str(v)[:40]

    out = ["| layer | length | ours fwd+bwd ms | mamba_ssm fwd+bwd ms | ours fwd ms |",
           "|---|---|---|---|---|"]
    variants = sorted({r["op"] for r in rows if r.get("section") == "layer"
                       and r.get("op", "").startswith("ssd[")})
    for op in ("ssd", "selective_scan", *variants):
        for length in sorted({r["length"] for r in rows
                              if r.get("section") == "layer" and r.get("op") == op}):
            out.append(f"| {op} | {size(length)} | "
                       f"{fmt(get('layer', 'ours', 'fwd_bwd_ms', op=op, length=length))} | "
                       f"{fmt(get('layer', 'mamba_ssm', 'fwd_bwd_ms', op=op, length=length))}"
                       f" | {fmt(get('layer', 'ours', 'fwd_ms', op=op, length=length))} |")
    out += ["", "| model | length | ours tok/s | ours peak GB | mamba_ssm tok/s | "
                "mamba_ssm peak GB |", "|---|---|---|---|---|---|"]
    for arch in ("mamba2", "mamba1"):
        for length in sorted({r["length"] for r in rows
                              if r.get("section") == "step" and r.get("arch") == arch
                              and "length" in r}):
            m = dict(arch=arch, length=length)
            ours_peak = get("step", "ours", "plan_bytes", **m)
            out.append(f"| {arch} | {size(length)} | "
                       f"{fmt(get('step', 'ours', 'tokens_per_s', **m), digits=0)} | "
                       f"{fmt(ours_peak, 1e-9, 1)} | "
                       f"{fmt(get('step', 'mamba_ssm', 'tokens_per_s', **m), digits=0)} | "
                       f"{fmt(get('step', 'mamba_ssm', 'peak_bytes', **m), 1e-9, 1)} |")
    return "\n".join(out)


def _parser():
    p = argparse.ArgumentParser(prog="python evals/bench/train.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--impl", choices=("ours", "official"), default="ours")
    p.add_argument("--sections", default="layers,steps")
    p.add_argument("--archs", default="mamba2,mamba1")
    p.add_argument("--layer-lengths", default=None, help="default 4K,16K,64K (quick: 64,128)")
    p.add_argument("--step-lengths", default=None, help="default 4K,16K (quick: 64)")
    p.add_argument("--backend", default=None, help="default pallas (quick: pallas-interpret)")
    p.add_argument("--remat", default="layer", choices=sorted(REMAT),
                   help="per layer: recompute all ('layer'), keep the projections' outputs "
                        "('dots'), or no remat ('none')")
    p.add_argument("--reps", type=int, default=10, help="launches per timing batch (layers)")
    p.add_argument("--step-reps", type=int, default=3, help="timed training steps")
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--ssd-backward-variants", default="",
                   help="';'-separated SSDBackwardConfig fields, each timed as one more SSD "
                        "layer row, e.g. 'heads_per_program=1;states_unroll=4'")
    p.add_argument("--official-src", default=".official")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes on CPU (Pallas interpreter with small blocks)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only join these JSON files (into --out) and print the table")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.merge:
        rows, meta = [], {}
        for path in args.merge:
            with open(path) as f:
                data = json.load(f)
            rows += data["rows"]
            meta[data.get("impl", path)] = data.get("meta", {})
        if args.out:
            write_json(args.out, {"meta": meta, "rows": rows})
        print(table(rows))
        return 0
    args.archs = [a for a in args.archs.split(",") if a]
    args.layer_lengths = lengths(args.layer_lengths or ("64,128" if args.quick
                                                        else "4K,16K,64K"))
    args.step_lengths = lengths(args.step_lengths or ("64" if args.quick else "4K,16K"))
    args.backend = args.backend or ("pallas-interpret" if args.quick else "pallas")
    args.interpret = args.backend == "pallas-interpret"
    sections = [s for s in args.sections.split(",") if s]
    budget = Budget(args.budget_s)
    rows: list[dict] = []
    meta = {"python": platform.python_version(), "jax": jax.__version__,
            "device": str(jax.devices()[0]), "quick": args.quick, "argv": sys.argv[1:]}
    if args.impl == "official":
        if args.quick:
            raise SystemExit("--impl official needs torch with CUDA (no --quick)")
        runs = {"layers": official_layers, "steps": official_steps}
    else:
        runs = {"layers": ours_layers, "steps": ours_steps}
    def emit(row):  # printed, and the JSON rewritten: a killed run keeps what it measured
        print(json.dumps(row), flush=True)
        if args.out:
            write_json(args.out, {"impl": args.impl, "meta": meta, "rows": rows})

    args.emit = emit
    for name in sections:
        if name not in runs:
            raise SystemExit(f"unknown section {name!r}; choose from {sorted(runs)}")
        runs[name](args, budget, rows)
    if args.out:
        write_json(args.out, {"impl": args.impl, "meta": meta, "rows": rows})
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
