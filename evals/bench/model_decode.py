"""Whole-model decode: tokens/s and ms/step at each batch after a `--prompt-len` prompt for each
decode implementation (`generate(decode_impl=...)`), their agreement with "scan", the kernel
census of one step in the optimized HLO, and the Mamba2 decode-step kernel checked and timed
against its reference (`stepcheck`)."""

from __future__ import annotations

import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import longmamba_jax as lmj
from longmamba_evals.bench.common import rel_err
from longmamba_evals.bench.model_setup import (
    model_config,
    model_costs,
    peak_bytes,
    random_params,
    random_tokens,
)
from longmamba_evals.bench.model_table import print_rows
from longmamba_evals.bench.timing import timed
from longmamba_jax.generation.generate import _decode_loop
from longmamba_jax.generation.sampling import Greedy

__all__ = ["sec_decode", "sec_stepcheck", "step_census"]


def _decode_once(params, cache, logits0, *, new_tokens, impl, backend):
    return _decode_loop(
        params, cache, logits0, jax.random.PRNGKey(0), None, jnp.zeros((0,), jnp.int32),
        jnp.int32(0), sampler=Greedy(), max_new_tokens=new_tokens, backend=backend,
        return_logits=False, decode_impl=impl)


def _one_step_logits(params, cache, tok, impl, backend):
    from longmamba_jax.generation.decode_steps import prepare_fused, split_layers
    from longmamba_jax.generation.generate import _step_body

    layers = {"unrolled": split_layers, "fused": lambda p: prepare_fused(p, None)}.get(
        impl, lambda p: None)(params)
    return _step_body(params, cache, tok, None, backend, layers, impl)[0]


_one_step = jax.jit(_one_step_logits, static_argnames=("impl", "backend"))


def sec_decode(args, arch: str) -> dict:
    params = random_params(arch, args.small)
    backend = lmj.resolve_backend(args.backend)
    rows, hlo = [], {}
    for batch in args.batches:
        tokens = random_tokens(batch, args.prompt_len, params.config.vocab_size, seed=batch)
        logits0, cache = jax.block_until_ready(lmj.prefill(params, tokens, backend=args.backend))
        outs = {}
        for impl in args.impls:
            # The loop donates its cache: every call gets its own copy (made before timing).
            copies = [jax.tree.map(jnp.copy, cache) for _ in range(args.decode_repeats + 1)]
            jax.block_until_ready(copies)
            t0 = time.perf_counter()
            outs[impl] = np.asarray(_decode_once(params, copies.pop(), logits0,
                                                 new_tokens=args.new_tokens, impl=impl,
                                                 backend=backend)[0])
            first = time.perf_counter() - t0
            _, times = timed(
                lambda c=copies, l0=logits0, i=impl: _decode_once(
                    params, c.pop(), l0, new_tokens=args.new_tokens, impl=i,
                    backend=backend)[0],
                args.decode_repeats - 1)
            t = statistics.median(times)
            steps = args.new_tokens - 1
            row = {"kind": "decode", "arch": arch, "impl": impl, "batch": batch,
                   "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "median_s": t, "tokens_per_s": batch * steps / t, "step_ms": 1e3 * t / steps,
                   "compile_s": max(first - t, 0.0), "times_s": times,
                   "peak_bytes_after": peak_bytes(),
                   "xla_flags": os.environ.get("XLA_FLAGS", "")}
            if args.hlo_stats:
                row["hlo"] = _hlo_stats(params, cache, logits0, impl, backend, args, batch, hlo)
                st = row["hlo"].get("step", {})
                print(f"  census {impl} b={batch}: {st.get('kernels')} kernels/step "
                      f"({st.get('kernels_per_layer', 0):.1f}/layer), fp32 temps >= 1M: "
                      f"{st.get('big_f32_fusions')}", flush=True)
            rows.append(row)
            print_rows(rows[-1:])
        # one teacher-forced step from the same cache: logits vs the scan step (greedy
        # agreement over 127 steps of a random bf16 model is no correctness signal: one early
        # near-tie flips the rest, as unrolled vs scan shows)
        tok = jnp.argmax(logits0, axis=-1).astype(jnp.int32)
        step = {impl: np.asarray(_one_step(params, cache, tok, impl=impl, backend=backend))
                for impl in args.impls}
        for impl in args.impls:
            if "scan" in step and impl != "scan":
                err = rel_err(step[impl], step["scan"])
                next(r for r in rows if r["batch"] == batch and r["impl"] == impl)[
                    "step_logits_rel_err_vs_scan"] = err
                print(f"  {impl} b={batch}: one-step logits rel. err vs scan {err:.1e}",
                      flush=True)
        ref = outs.get("scan")
        for impl, toks in outs.items():
            if ref is not None and impl != "scan":
                agree = float(np.mean(toks == ref))
                next(r for r in rows if r["batch"] == batch and r["impl"] == impl)[
                    "tokens_agree_with_scan"] = agree
                print(f"  {impl} b={batch}: greedy tokens agree with scan: {agree:.3f}",
                      flush=True)
    return {"rows": rows, "costs": model_costs(params)}


def _hlo_stats(params, cache, logits0, impl, backend, args, batch, texts) -> dict:
    """Counts in the optimized HLO of the decode loop: loops, copies, slices, kernels; and the
    kernel census of the decode loop's body (one step): launches by kind, per layer, and
    the fp32 temporaries of at least 1M elements (e.g. a materialized matmul product)."""
    lowered = _decode_loop.lower(
        params, cache, logits0, jax.random.PRNGKey(0), None, jnp.zeros((0,), jnp.int32),
        jnp.int32(0), sampler=Greedy(), max_new_tokens=args.new_tokens, backend=backend,
        return_logits=False, decode_impl=impl)
    text = lowered.compile().as_text()
    if args.dump_dir:
        path = os.path.join(args.dump_dir, f"decode_{params.config.arch}_{impl}_b{batch}.hlo.txt")
        with open(path, "w") as f:
            f.write(text)
    keys = {"while": " while(", "copy": " copy(", "copy_start": "copy-start(",
            "dynamic_slice": "dynamic-slice(", "dynamic_update_slice": "dynamic-update-slice(",
            "fusion": " fusion(", "custom_call": "custom-call(", "command_buffer": "command_buffer"}
    out = {k: text.count(v) for k, v in keys.items()}
    out["step"] = step_census(text, params.config.n_layer)
    return out


def step_census(text: str, n_layer: int) -> dict:
    """Kernel launches in the body of the outermost decode `while` (one step) of an optimized
    HLO text: every fusion, custom call (Pallas / cuBLAS), copy and dynamic-update-slice."""
    whiles = re.findall(r" while\(.*?body=%([\w.\-]+)", text)
    if not whiles:
        return {}
    body = whiles[-1]  # the entry computation comes last: its while is the decode loop
    start = text.find(f"\n%{body} ")
    if start < 0:
        return {}
    end = text.find("\n}\n", start)
    kinds: dict[str, int] = {}
    big_f32 = 0
    for line in text[start:end].splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(", line)
        if not m or m.group(3) not in ("fusion", "custom-call", "copy", "dynamic-update-slice",
                                       "fusion-start", "while", "conditional"):
            continue
        name = re.sub(r"\.\d+$", "", m.group(1))
        kinds[name] = kinds.get(name, 0) + 1
        for dims in re.findall(r"f32\[([\d,]+)\]", m.group(2)):
            if np.prod([int(d) for d in dims.split(",")]) >= 1 << 20 and m.group(3) == "fusion":
                big_f32 += 1
                break
    total = sum(v for k, v in kinds.items() if k != "fusion-start")
    return {"kernels": total, "kernels_per_layer": total / n_layer, "by_name": kinds,
            "big_f32_fusions": big_f32}


def sec_stepcheck(args) -> dict:
    """The Mamba2 decode-step kernel (`longmamba_kernels.ssd.step`) compiled on this device
    against its jnp reference at mamba2-1.3b's shapes (batch 1 and 8, LongMamba filter off and
    on), then the parts of a decode step timed alone, each as a chain of n_layer calls with
    the real per-layer shapes (so that one call's time ≈ one step's share of that part):
    the step kernel vs the reference step, the in_proj GEMV, the out_proj GEMV as written
    (one row: XLA rewrites it into multiply + reduce) and with the row padded to two."""
    from longmamba_kernels.ssd.step import ssd_decode_step

    cfg = model_config("mamba2", args.small)
    L, h, p, n, G = cfg.n_layer, cfg.nheads, cfg.headdim, cfg.d_state, cfg.ngroups
    E, conv_dim, d, K = cfg.d_inner, cfg.conv_dim, cfg.d_model, cfg.d_conv
    bf16 = jnp.float32 if args.small else jnp.bfloat16
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 32))

    def rnd(shape, scale=1.0, dtype=jnp.float32):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    w = dict(conv_weight=rnd((K, conv_dim), 0.5, bf16), conv_bias=rnd((conv_dim,), 0.1, bf16),
             dt_bias=rnd((h,), 1.0, bf16), A=-jnp.exp(rnd((h,))), D=rnd((h,), 1.0, bf16))
    kw = dict(ngroups=G, headdim=p, d_state=n)
    out = {"checks": [], "timings": []}
    for batch in args.batches:
        zx = rnd((batch, cfg.in_proj_dim), 1.0, bf16)
        conv = rnd((L, batch, K - 1, conv_dim))
        ssm = rnd((L, batch, h, p, n))
        # bf16 inputs: x, B, C are rounded to bf16 after the conv, so an ulp of difference in
        # the fp32 conv sum can flip a rounding (~4e-3 on that element); fp32 inputs show the
        # kernel's own error.
        for filtered, dtype in ((False, bf16), (True, bf16), (False, jnp.float32),
                                (True, jnp.float32)):
            thr = jnp.where(jnp.arange(h) % 2 == 0, 0.7, -jnp.inf) if filtered else None
            wd = {k: (v.astype(dtype) if v.dtype == bf16 else v) for k, v in w.items()}
            res = {}
            for impl in ("reference", "pallas"):
                f = jax.jit(lambda zx, conv, ssm, thr, impl=impl, wd=wd: ssd_decode_step(
                    zx, conv, ssm, threshold=thr, layer=L // 2, implementation=impl,
                    interpret=args.small and impl == "pallas", **wd, **kw))
                res[impl] = [np.asarray(a, np.float64)
                             for a in f(zx.astype(dtype), conv, ssm, thr)]
            row = {"batch": batch, "filtered": filtered, "dtype": str(jnp.dtype(dtype))}
            pairs = zip(("g", "conv", "ssm"), res["pallas"], res["reference"], strict=True)
            for name, a, b in pairs:
                row[f"rel_err_{name}"] = rel_err(a, b)
                row[f"finite_{name}"] = bool(np.isfinite(a).all())
            out["checks"].append(row)
            print(f"step kernel vs reference b={batch} {row['dtype']} filter={filtered}: "
                  + ", ".join(
                f"{k} {v:.1e}" for k, v in row.items() if k.startswith("rel")), flush=True)

        def chain_time(fn, *xs, donate=()):
            f = jax.jit(fn, donate_argnums=donate)
            state = [jnp.copy(a) if i in donate else a for i, a in enumerate(xs)]
            res = jax.block_until_ready(f(*state))
            times = []
            for _ in range(args.decode_repeats * 5):
                if donate:
                    state[donate[0]] = res[-1]
                t0 = time.perf_counter()
                res = jax.block_until_ready(f(*state))
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        for impl in ("reference", "pallas"):
            def steps(zx, conv, ssm, impl=impl):
                gs = []
                for i in range(L):
                    g, _, ssm = ssd_decode_step(zx, conv, ssm, layer=i, implementation=impl,
                                                interpret=args.small and impl == "pallas",
                                                **w, **kw)
                    gs.append(g)
                return jnp.stack(gs), ssm
            t = chain_time(steps, zx, conv, ssm, donate=(2,))
            out["timings"].append({"part": f"ssm_step_{impl}", "batch": batch, "chain_s": t,
                                   "us_per_layer": 1e6 * t / L})
        w_in = rnd((L, d, cfg.in_proj_dim), 0.02, bf16)
        w_out = rnd((L, E, d), 0.02, bf16)

        def gemv(x, ws, pad):
            for i in range(ws.shape[0]):
                xp = jnp.pad(x, ((0, 1), (0, 0))) if pad and x.shape[0] == 1 else x
                y = jnp.einsum("bi,io->bo", xp, ws[i],
                               preferred_element_type=jnp.float32)[:x.shape[0]].astype(bf16)
                x = jnp.concatenate([y] * (x.shape[1] // y.shape[1]), axis=1) \
                    if y.shape[1] < x.shape[1] else y[:, :x.shape[1]]
            return (x,)
        for part, ws, pad in (("in_proj", w_in, False), ("out_proj_1row", w_out, False),
                              ("out_proj_2rows", w_out, True)):
            x0 = rnd((batch, ws.shape[1]), 1.0, bf16)
            t = chain_time(lambda x, ws, pad=pad: gemv(x, ws, pad), x0, ws)
            nbytes = ws.size * ws.dtype.itemsize
            out["timings"].append({"part": part, "batch": batch, "chain_s": t,
                                   "us_per_layer": 1e6 * t / L, "weight_GBps": nbytes / t / 1e9})
        del w_in, w_out
        for r in out["timings"]:
            if r["batch"] == batch:
                extra = f", {r['weight_GBps']:,.0f} GB/s" if "weight_GBps" in r else ""
                print(f"  part {r['part']:18s} b={batch}: {r['us_per_layer']:7.1f} us/layer"
                      f"{extra}", flush=True)
    return out
