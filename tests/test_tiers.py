"""tests/slow_tests.txt marks tests by node id (conftest.py applies the marks). A renamed or
removed test silently loses its mark, and a slow one falls back into the default tier: every
entry must name a test function that exists (parameter ids are not checked)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _test_functions(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.FunctionDef)}


def test_every_listed_test_exists():
    functions: dict[Path, set[str]] = {}
    missing = []
    for line in (ROOT / "tests" / "slow_tests.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        mark, nodeid = line.split(maxsplit=1)
        assert mark in ("slow", "extended"), f"unknown tier {mark!r}: {line}"
        path, _, name = nodeid.partition("::")
        file = ROOT / path
        if file not in functions:
            functions[file] = _test_functions(file)
        if name.split("[", 1)[0] not in functions[file]:
            missing.append(nodeid)
    assert not missing, f"tests/slow_tests.txt names tests that do not exist: {missing}"
