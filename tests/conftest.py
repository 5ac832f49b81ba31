"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from longmamba_evals.tasks.text import DEFAULT_TEXT

SLOW_TESTS = Path(__file__).with_name("slow_tests.txt")


def pytest_collection_modifyitems(config, items):
    """Marks the tests tests/slow_tests.txt lists (the slowest of a timed run; see
    tests/list_slow_tests.py): `slow`, or `extended` (and slow), beside the marks in the code."""
    if not SLOW_TESTS.exists():
        return
    listed = {}
    for line in SLOW_TESTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            mark, nodeid = line.split(maxsplit=1)
            listed[nodeid] = mark
    for item in items:
        mark = listed.get(item.nodeid)
        if mark is not None:
            item.add_marker(pytest.mark.slow)
        if mark == "extended":
            item.add_marker(pytest.mark.extended)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """The first 6,000 words of the bundled filler text, as a file (training/eval tests)."""
    words = Path(DEFAULT_TEXT).read_text(encoding="utf-8").split()[:6000]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(words))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def _fresh_jax_caches():
    """Drop JAX's compiled programs after each module. Without this, the full suite hit a
    segfault inside XLA:CPU compilation (jax 0.10.2) in test_train_eval.py after the
    interpret-mode kernel tests. That module alone, or with test_kernels.py, passes."""
    yield
    import jax

    jax.clear_caches()
