"""The bundled demo model: `python -m longmamba_jax.demo` (see `longmamba_jax._demo`).

    python -m longmamba_jax.demo [--multiple 16] [--depth 0.5] [--key 12345 | --seed 0]

loads the bundled 5.8M-parameter byte-level Mamba2 (trained at L_train = 512) from its torch
checkpoint through `longmamba_jax.load`, builds a passkey prompt at 16x L_train, and prints what
vanilla and LongMamba answer, the true key and the time taken.
"""

import sys

from longmamba_jax._demo import DEMO_DIR, DemoModel, demo_model, main

__all__ = ["DEMO_DIR", "DemoModel", "demo_model", "main"]

if __name__ == "__main__":
    sys.exit(main())
