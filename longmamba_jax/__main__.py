"""`python -m longmamba_jax <command> [options]`.

    python -m longmamba_jax generate --model demo --prompt "..."   # = longmamba-generate
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv, prog), one-line description)
COMMANDS = {
    "generate": ("longmamba_jax.generation.cli", "generate text from a prompt"),
}
USAGE = "usage: python -m longmamba_jax {" + ",".join(COMMANDS) + "} [options]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [USAGE, "", "commands:"]
        lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
        lines += ["", "python -m longmamba_jax COMMAND --help for its options"]
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{USAGE}\npython -m longmamba_jax: error: unknown command {name!r} (choose from "
              f"{', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"python -m longmamba_jax {name}")


if __name__ == "__main__":
    sys.exit(main())
