"""End-to-end speed of the whole model (issue 7): random-weight models with exactly
mamba2-1.3b's shapes (d_model 2048, 48 layers, vocab 50277 -> 50288, d_state 128, headdim 64,
expand 2, ngroups 1) and mamba-1.4b's (Mamba-1, d_state 16), bf16 parameters. No checkpoint.

Measured (every timed call waited for; compile time = first call − median, reported apart):
- ceilings of this device: copy bandwidth (`a + 1` on a large fp32 array, bytes read + written)
  and a bf16 matmul rate, for the physical-limit columns;
- prefill tokens/s at each length (batch 1, logits of the last token only), vanilla and with
  LongMamba filters on (half the channels global, θ = each channel's median Δ on a 2K prompt:
  about a quarter of all (token, channel) Δ zeroed); the two are timed alternately, and the
  overhead is their median ratio − 1;
- decode tokens/s and ms/step at batch 1 and 8 after a 1K prompt, for each decode
  implementation (`generate(decode_impl=...)`: "scan", "unrolled"), and whether their greedy
  tokens agree;
- peak device memory: the process peak after each measurement (`peak_bytes_in_use`, monotone:
  each section runs in its own process, smallest measurement first) and the compiled program's
  own footprint (XLA memory analysis: arguments + outputs + temporaries);
- long prompts (mamba2): `prefill_chunked` of a 1,048,576-token prompt in 64K chunks (time,
  peak memory, NaN check; vanilla and LongMamba) and chunked == one-shot at 128K (relative
  error of the last logits and of the final SSM state);
- the decode loop under XLA flag variants (command buffers / CUDA graphs for the while loop,
  full unrolling of the layer loop), each in a subprocess with its own `XLA_FLAGS`;
- with `--compare-mamba-ssm`: the official mamba_ssm stack on the same shapes, when importable
  (skips with a message otherwise).

Each section runs in a subprocess (clean peak memory; a crash loses one section), under one
time budget; the JSON is rewritten after every section, so a run cut short keeps what finished.

    python evals/bench_model.py --out model_h100.json                # on the GPU machine
    python evals/bench_model.py --small --out /tmp/model_small.json  # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import longmamba_jax as lmj
from longmamba_evals.bench_generate import CONFIGS, DTYPES, SMALL, _device, _timed, _tokens
from longmamba_jax.generation.generate import _decode_loop
from longmamba_jax.generation.sampling import Greedy
from longmamba_jax.model import LayerFilters, apply_model

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


# ----------------------------------------------------------------------------------------------
# helpers


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _program_bytes(jitted, *args, **kwargs) -> int | None:
    """Arguments + outputs + temporaries of the compiled program (None if unavailable)."""
    try:
        m = jitted.lower(*args, **kwargs).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - an optional column; some backends have no analysis
        return None


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree))


def _config(arch: str, small: bool):
    return (SMALL if small else CONFIGS)[arch]()


def _params(arch: str, small: bool):
    config = _config(arch, small)
    dtype = jnp.float32 if small else DTYPES["bf16"]
    params = jax.jit(lambda: lmj.init_params(config, 0, dtype))()
    return jax.block_until_ready(params)


class FixedFilters:
    """A method with the shape of `LongMamba`: the same filter arrays at every length."""

    filter_decode = False

    def __init__(self, filters: LayerFilters):
        self.filters = filters

    def model_kwargs(self, config, seq_len):
        return {"filters": self.filters}


def synthetic_longmamba(params, length: int = 2048) -> FixedFilters:
    """Half the channels global (even indices), θ = each channel's median Δ on a random prompt
    of `length` tokens: a real workload for the filter (a random model's calibration would make
    no channel global: its tA_prod underflows)."""
    tokens = _tokens(1, length, params.config.vocab_size, seed=7)
    dt = apply_model(params, tokens, capture_dt=True, last_n=1).dt  # [n_layer, 1, l, C]
    theta = jnp.median(dt[:, 0], axis=1)  # [n_layer, C]
    channels = theta.shape[1]
    is_global = jnp.broadcast_to(jnp.arange(channels) % 2 == 0, theta.shape)
    return FixedFilters(LayerFilters(is_global, theta.astype(jnp.float32)))


def model_costs(params) -> dict:
    """FLOPs per prefill token (2 × matmul weights of the layers) and the bytes a decode step
    must move (all weights once, the head included; the cache is added per batch)."""
    w = params.weights
    proj = 0
    for path, a in jax.tree_util.tree_leaves_with_path(w["layers"]):
        if "proj" in jax.tree_util.keystr(path):
            proj += int(np.prod(a.shape[1:])) * a.shape[0]
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w))
    cache = lmj.empty_cache(params.config, 1)
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return {"flops_per_token": 2 * proj, "weight_bytes": weight_bytes,
            "cache_bytes_per_seq": cache_bytes}


# ----------------------------------------------------------------------------------------------
# sections (each runs in a worker process)


def sec_ceilings(args) -> dict:
    n = (1 << 24) if args.small else (1 << 29)  # fp32 elements: 64 MB / 2 GiB
    a = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
    inc = jax.jit(lambda x: x + 1)
    _, times = _timed(lambda: inc(a), 10)
    copy_bw = 2 * 4 * n / statistics.median(times)
    m = 512 if args.small else 8192
    dt = jnp.float32 if args.small else jnp.bfloat16
    x = jax.random.normal(jax.random.PRNGKey(1), (m, m), dt)
    y = jax.random.normal(jax.random.PRNGKey(2), (m, m), dt)
    mm = jax.jit(lambda p, q: p @ q)
    _, times = _timed(lambda: mm(x, y), 10)
    return {"copy_bytes_per_s": copy_bw, "copy_array_bytes": 4 * n,
            "matmul_flops_per_s": 2 * m**3 / statistics.median(times), "matmul_n": m,
            "matmul_dtype": str(jnp.dtype(dt))}


def sec_prefill(args, arch: str) -> dict:
    params = _params(arch, args.small)
    method = synthetic_longmamba(params, 256 if args.small else 2048)
    backend = lmj.resolve_backend(args.backend)
    rows = []
    for length in args.lengths:
        tokens = _tokens(1, length, params.config.vocab_size, seed=length)
        fns = {"vanilla": lambda t=tokens: lmj.prefill(params, t, backend=args.backend),
               "longmamba": lambda t=tokens: lmj.prefill(params, t, backend=args.backend,
                                                         method=method)}
        first, times, peaks = {}, {k: [] for k in fns}, {}
        for name, fn in fns.items():  # compile both, then time them alternately
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn())
            first[name] = time.perf_counter() - t0
            if not _finite(out):
                raise FloatingPointError(f"{arch} prefill {name} at {length}: NaN/inf")
            peaks[name] = _peak_bytes()
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - t0)
        for name in fns:
            t = statistics.median(times[name])
            kwargs = {"filters": method.filters} if name == "longmamba" else {}
            rows.append({
                "kind": "prefill", "arch": arch, "method": name, "batch": 1, "length": length,
                "median_s": t, "tokens_per_s": length / t,
                "compile_s": max(first[name] - t, 0.0), "times_s": times[name],
                "peak_bytes_after": peaks[name],
                "program_bytes": _program_bytes(apply_model, params, jnp.asarray(tokens),
                                                backend=backend, last_n=1, return_cache=True,
                                                **kwargs),
            })
        v, lm = (statistics.median(times[k]) for k in ("vanilla", "longmamba"))
        rows[-1]["overhead_pct"] = 100 * (lm / v - 1)
        # spread of the vanilla runs: an overhead smaller than this is noise
        rows[-2]["spread_pct"] = 100 * (max(times["vanilla"]) / min(times["vanilla"]) - 1)
        _print_rows(rows[-2:])
    return {"rows": rows, "costs": model_costs(params)}


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
    params = _params(arch, args.small)
    backend = lmj.resolve_backend(args.backend)
    rows, hlo = [], {}
    for batch in args.batches:
        tokens = _tokens(batch, args.prompt_len, params.config.vocab_size, seed=batch)
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
            _, times = _timed(
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
                   "peak_bytes_after": _peak_bytes(),
                   "xla_flags": os.environ.get("XLA_FLAGS", "")}
            if args.hlo_stats:
                row["hlo"] = _hlo_stats(params, cache, logits0, impl, backend, args, batch, hlo)
                st = row["hlo"].get("step", {})
                print(f"  census {impl} b={batch}: {st.get('kernels')} kernels/step "
                      f"({st.get('kernels_per_layer', 0):.1f}/layer), fp32 temps >= 1M: "
                      f"{st.get('big_f32_fusions')}", flush=True)
            rows.append(row)
            _print_rows(rows[-1:])
        # one teacher-forced step from the same cache: logits vs the scan step (greedy
        # agreement over 127 steps of a random bf16 model is no correctness signal: one early
        # near-tie flips the rest, as unrolled vs scan shows)
        tok = jnp.argmax(logits0, axis=-1).astype(jnp.int32)
        step = {impl: np.asarray(_one_step(params, cache, tok, impl=impl, backend=backend))
                for impl in args.impls}
        for impl in args.impls:
            if "scan" in step and impl != "scan":
                err = _rel(step[impl], step["scan"])
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
    import re

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

    cfg = _config("mamba2", args.small)
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
                row[f"rel_err_{name}"] = _rel(a, b)
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


def sec_longprompt(args) -> dict:
    params = _params("mamba2", args.small)
    vocab = params.config.vocab_size
    out = {}
    chunk = args.chunk
    # 1. warm-up: one chunk through the chunked path (compiles the chunk program)
    warm = _tokens(1, chunk, vocab, seed=11)
    t0 = time.perf_counter()
    jax.block_until_ready(lmj.prefill_chunked(params, warm, chunk_size=chunk,
                                              backend=args.backend))
    out["chunk_compile_and_run_s"] = time.perf_counter() - t0
    # 2. the long prompt, vanilla then LongMamba (θ for the total length in every chunk)
    long_tokens = _tokens(1, args.long_len, vocab, seed=12)
    method = synthetic_longmamba(params, 256 if args.small else 2048)
    for name, meth in (("vanilla", None), ("longmamba", method)):
        if name == "longmamba":  # compile its chunk program outside the timing
            jax.block_until_ready(lmj.prefill_chunked(params, warm, chunk_size=chunk,
                                                      backend=args.backend, method=meth))
        t0 = time.perf_counter()
        logits, cache = jax.block_until_ready(lmj.prefill_chunked(
            params, long_tokens, chunk_size=chunk, backend=args.backend, method=meth))
        t = time.perf_counter() - t0
        out[f"long_{name}"] = {
            "length": args.long_len, "chunk": chunk, "s": t, "tokens_per_s": args.long_len / t,
            "finite": _finite((logits, cache)), "peak_bytes_after": _peak_bytes(),
        }
        print(f"long prompt {name}: {args.long_len:,} tokens in {t:.2f} s "
              f"({args.long_len / t:,.0f} tok/s), finite={out[f'long_{name}']['finite']}, "
              f"peak {_gib(_peak_bytes())}", flush=True)
    # 3. chunked == one-shot where both fit
    eq_tokens = _tokens(1, args.eq_len, vocab, seed=13)
    for name, meth in (("vanilla", None), ("longmamba", method)):
        ref_logits, ref_cache = jax.block_until_ready(
            lmj.prefill(params, eq_tokens, backend=args.backend, method=meth))
        logits, cache = jax.block_until_ready(lmj.prefill_chunked(
            params, eq_tokens, chunk_size=chunk, backend=args.backend, method=meth))
        out[f"equal_{name}"] = {
            "length": args.eq_len, "chunk": chunk,
            "rel_err_logits": _rel(logits, ref_logits),
            "rel_err_ssm_state": _rel(cache.ssm, ref_cache.ssm),
            "finite": _finite((logits, cache, ref_logits, ref_cache)),
            "peak_bytes_after_one_shot": _peak_bytes(),
        }
        print(f"chunked vs one-shot {name} at {args.eq_len:,}: logits rel "
              f"{out[f'equal_{name}']['rel_err_logits']:.2e}, state rel "
              f"{out[f'equal_{name}']['rel_err_ssm_state']:.2e}", flush=True)
    return out


def sec_mamba_ssm(args) -> dict:
    """The official stack on the same shapes, in the same run: mamba_ssm's `MambaLMHeadModel`
    (random weights, bf16, CUDA) from the unpacked sources in `--official-src`
    (`official_mamba.import_mamba_ssm`). Prefill at each length (batch 1, `num_last_tokens=1`)
    and decode at each batch after a `--prompt-len` prompt with its CUDA-graph decoding
    (`generate(..., cg=True)`). Without the causal_conv1d extension its Mamba2 blocks run with
    `use_mem_eff_path=False` (the fused path calls causal_conv1d): torch conv1d, Triton SSD
    (`mamba_chunk_scan_combined`), Triton gated RMSNorm and `selective_state_update`. Mamba-1
    needs the `selective_scan_cuda` extension: skipped without it."""
    try:
        import torch

        from longmamba_evals.official_mamba import has_causal_conv1d, import_mamba_ssm

        mamba_ssm = import_mamba_ssm(args.official_src)
        from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
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
        if arch == "mamba1":
            try:
                import selective_scan_cuda

                selective_scan_cuda.fwd  # noqa: B018 - the stand-in module has no attribute
            except (ImportError, AttributeError):
                out["rows"].append({"arch": arch, "skipped": "selective_scan_cuda not built"})
                continue
        out["rows"] += _mamba_ssm_arch(args, arch, torch, SsmConfig, MambaLMHeadModel, conv_ext)
        torch.cuda.empty_cache()
    return out


def _torch_timed(torch, fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _mamba_ssm_arch(args, arch, torch, SsmConfig, MambaLMHeadModel, conv_ext) -> list[dict]:  # noqa: N803
    ssm_cfg = {"layer": "Mamba2", "use_mem_eff_path": conv_ext} if arch == "mamba2" \
        else {"layer": "Mamba1"}
    cfg = SsmConfig(d_model=2048, n_layer=48, vocab_size=50277, ssm_cfg=ssm_cfg, rms_norm=True,
                    residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16,
                    tie_embeddings=True)
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()
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


# ----------------------------------------------------------------------------------------------
# printing


def _gib(b) -> str:
    return "?" if b is None else f"{b / 2**30:.2f} GiB"


def _print_rows(rows):
    for r in rows:
        if r["kind"] == "prefill":
            extra = f", overhead {r['overhead_pct']:+.2f}%" if "overhead_pct" in r else ""
            print(f"{r['arch']} prefill {r['method']:9s} L={r['length']:>6}: "
                  f"{r['tokens_per_s']:>10,.0f} tok/s ({1e3 * r['median_s']:.1f} ms), compile "
                  f"{r['compile_s']:.1f} s, program {_gib(r['program_bytes'])}{extra}",
                  flush=True)
        else:
            print(f"{r['arch']} decode {r['impl']:8s} b={r['batch']}: {r['tokens_per_s']:>8,.0f} "
                  f"tok/s, {r['step_ms']:.3f} ms/step, compile {r['compile_s']:.1f} s "
                  f"{r.get('xla_flags', '')}", flush=True)


def table(result: dict) -> str:
    """The markdown summary: each number with its physical limit (the official stack's rows
    use our model's costs: same shapes)."""
    secs = result.get("sections", {})
    ceil = secs.get("ceilings", {})
    bw, mm = ceil.get("copy_bytes_per_s"), ceil.get("matmul_flops_per_s")
    costs_by_arch = {k.split(":")[1]: v["costs"] for k, v in secs.items()
                     if ":" in k and "@" not in k and "costs" in v}
    lines = ["| arch | what | variant | batch | length | tokens/s | ms | limit tok/s | % of limit "
             "| compile s | program mem |", "|" + "---|" * 11]
    for key, sec in secs.items():
        kind, _, rest = key.partition(":")
        if kind not in ("prefill", "decode", "mamba_ssm") or "rows" not in sec:
            continue
        for r in sec["rows"]:
            if "tokens_per_s" not in r:
                continue
            costs = sec.get("costs") or costs_by_arch.get(r["arch"])
            limit = None
            if costs and r["kind"] == "prefill" and mm:
                limit = mm / costs["flops_per_token"]
            elif costs and r["kind"] == "decode" and bw:
                step_bytes = costs["weight_bytes"] + 2 * r["batch"] * costs["cache_bytes_per_seq"]
                limit = r["batch"] * bw / step_bytes
            if kind == "mamba_ssm":
                variant = "mamba_ssm" + (" (cuda graphs)" if r["kind"] == "decode" else "")
            else:
                variant = r.get("method") or (r["impl"] + (f" [{key.split('@')[1]}]"
                                                           if "@" in key else ""))
            ms = 1e3 * r["median_s"] if r["kind"] == "prefill" else r["step_ms"]
            length = r.get("length", f"{r.get('prompt_len')}+{r.get('new_tokens')}")
            lim = f"{limit:,.0f}" if limit else ""
            pct = f"{100 * r['tokens_per_s'] / limit:.0f}%" if limit else ""
            extra = f" ({r['overhead_pct']:+.2f}%)" if "overhead_pct" in r else ""
            comp = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
            lines.append(f"| {r['arch']} | {r['kind']} | {variant}{extra} | {r['batch']} | "
                         f"{length} | {r['tokens_per_s']:,.0f} | {ms:.2f} | {lim} | {pct} | "
                         f"{comp} | {_gib(r.get('program_bytes'))} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# orchestration


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
                   help="folder holding the unpacked mamba_ssm sources (official_mamba.py)")
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
        with open(args.worker_out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        return res

    t_start = time.perf_counter()
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else "/tmp"
    if args.dump_dir:
        os.makedirs(args.dump_dir, exist_ok=True)
    result = {"device": _device(), "jax": jax.__version__, "longmamba_jax": lmj.__version__,
              "python": platform.python_version(), "small": args.small,
              "backend": args.backend, "resolved_backend": str(lmj.resolve_backend(args.backend)),
              "configs": {a: _config(a, args.small).to_dict() for a in args.archs},
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
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, default=str)
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
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"\nsaved {args.out} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
