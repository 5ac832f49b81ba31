"""`python -m convert` (from the repository root): see `longmamba_convert.cli`."""

from longmamba_convert.cli import main

raise SystemExit(main(prog="python -m convert"))
