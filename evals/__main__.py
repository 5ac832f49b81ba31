"""`python -m evals <task> ...` from the repository root (see `longmamba_evals.tasks.cli`)."""

from longmamba_evals.tasks.cli import main

main(prog="python -m evals")
