"""`python -m evals <task> ...` from the repository root (see `longmamba_evals.cli`)."""

from longmamba_evals.cli import main

main()
