"""XLA temporary memory of the gradient of one Mamba-1 selective-scan layer, per implementation.

    python evals/bench/scan_grad_memory.py [--b 16] [--l 512] [--e 768] [--n 16]
    python evals/bench/scan_grad_memory.py --train-step [--seeds 3] [--micro-batches 2]

Compiles jax.grad of sum(y²) w.r.t. x, Δ, B, C for the sequential reference and for the chunked
associative scan (which rematerialises each chunk under autodiff) at several chunk sizes, and
prints `compiled.memory_analysis().temp_size_in_bytes`. Nothing runs, so any backend works
(the figures in kernels/selective_scan/associative.py are from the CPU backend).

`--train-step`: the same for the whole Mamba-1 training step of `evals/short_train/` (d_state 16,
the seeds vmapped, bucket 512, 32K tokens per step), through each scan backend: whether the
step fits on a GPU before GPU time is spent on it.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from longmamba_kernels.selective_scan.associative import selective_scan_associative
from longmamba_kernels.selective_scan.reference import selective_scan_reference


def temp_gb(fn, b: int, l: int, e: int, n: int) -> float:
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(k[0], (b, l, e))
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, l, e)) - 2.0)
    A = -jnp.exp(jax.random.normal(k[2], (e, n)))
    B, C = (jax.random.normal(kk, (b, l, n)) for kk in k[3:5])

    def loss(x, dt, B, C):
        y, _ = fn(x, dt, A, B, C)
        return jnp.sum(y * y)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, dt, B, C).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 1e9


def train_step_temp_gb(backend: str, seeds: int, micro_batches: int, bucket: int = 512) -> float:
    """Temporaries of the vmapped Mamba-1 training step (`short_train.train_model.make_steps`)."""
    from longmamba_evals.short_train.train_config import TrainConfig, build_model_config
    from longmamba_evals.short_train.train_model import init_state, make_steps, stack_trees

    tc = TrainConfig(arch="mamba1", d_state=16, scan_backend=backend,
                     micro_batches=micro_batches)
    config = build_model_config(tc)
    step, _, optimizer = make_steps(tc, config)
    state = jax.eval_shape(
        lambda: stack_trees([init_state(tc, config, s, optimizer) for s in range(seeds)]))
    shape = (seeds, tc.tokens_per_step // bucket, bucket)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32 if k == "tokens" else jnp.float32)
             for k in ("tokens", "attention_mask", "answer", "second", "lm")}
    compiled = step.lower(state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("b", 16), ("l", 512), ("e", 768), ("n", 16)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--train-step", action="store_true",
                   help="the whole Mamba-1 training step instead of one scan layer")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--micro-batches", type=int, default=2)
    a = p.parse_args(argv)
    if a.train_step:
        print(f"Mamba-1 training step temporaries, {a.seeds} seeds vmapped, "
              f"{a.micro_batches} micro-batches, bucket 512, {jax.default_backend()}")
        for backend in ("associative", "reference"):
            print(f"  {backend}: {train_step_temp_gb(backend, a.seeds, a.micro_batches):.1f} GB",
                  flush=True)
        return
    print(f"gradient temporaries, b={a.b} l={a.l} e={a.e} n={a.n}, {jax.default_backend()}")
    ref = temp_gb(selective_scan_reference, a.b, a.l, a.e, a.n)
    print(f"  reference (lax.scan over time): {ref:.2f} GB")
    for chunk in (128, 64, 32):
        fn = lambda *args, chunk=chunk: selective_scan_associative(*args, chunk_size=chunk)
        print(f"  associative, chunk {chunk:3d}:        {temp_gb(fn, a.b, a.l, a.e, a.n):.2f} GB")


if __name__ == "__main__":
    main()
