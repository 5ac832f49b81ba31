"""XLA temporary memory of the gradient of one Mamba-1 selective-scan layer, per implementation.

    python evals/scan_grad_memory.py [--b 16] [--l 512] [--e 768] [--n 16]

Compiles jax.grad of sum(y²) w.r.t. x, Δ, B, C for the sequential reference and for the chunked
associative scan (which rematerialises each chunk under autodiff) at several chunk sizes, and
prints `compiled.memory_analysis().temp_size_in_bytes`. Nothing runs, so any backend works
(the figures in kernels/selective_scan_associative.py are from the CPU backend).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from longmamba_kernels.selective_scan_associative import selective_scan_associative
from longmamba_kernels.selective_scan_reference import selective_scan_reference


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("b", 16), ("l", 512), ("e", 768), ("n", 16)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args(argv)
    print(f"gradient temporaries, b={a.b} l={a.l} e={a.e} n={a.n}, {jax.default_backend()}")
    ref = temp_gb(selective_scan_reference, a.b, a.l, a.e, a.n)
    print(f"  reference (lax.scan over time): {ref:.2f} GB")
    for chunk in (128, 64, 32):
        fn = lambda *args, chunk=chunk: selective_scan_associative(*args, chunk_size=chunk)
        print(f"  associative, chunk {chunk:3d}:        {temp_gb(fn, a.b, a.l, a.e, a.n):.2f} GB")


if __name__ == "__main__":
    main()
