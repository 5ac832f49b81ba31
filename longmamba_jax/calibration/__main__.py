"""`python -m longmamba_jax.calibration`: see `longmamba_jax.calibration.cli`."""

import sys

from longmamba_jax.calibration.cli import main

sys.exit(main())
