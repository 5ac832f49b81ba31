"""Writes tests/slow_tests.txt, the tests left out of the quicker tiers, from a timed run.

    python -m pytest -q -n 2 -m "" --durations=0 > durations.log   # every test, timed
    python tests/list_slow_tests.py durations.log [--quick-s 170] [--default-s 1150]

A test's time is its setup + call + teardown as pytest reports them. The slowest tests are
marked `slow` until the rest add up to at most --quick-s seconds of CPU (the quick tier, `-m
"not slow"`: on two workers it takes about half of that), and the slowest of those `extended`
until the rest add up to at most --default-s (the default tier, what the README's command and CI
run). Tests marked in the code keep their marks whatever this list says; `gpu` tests are
skipped without a GPU and cost nothing here. What ALWAYS_DEFAULT names (parity with the torch
models, the reliability guarantees, the readers' fuzz test, and one check of each feature:
sharding, training, packed kernels) stays in the default tier whatever it costs.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S.*?)\s*$")  # ids may hold spaces
OUT = Path(__file__).with_name("slow_tests.txt")
ALWAYS_DEFAULT = (  # whole files, or single tests: one of each feature's checks stays in CI
    "tests/test_parity.py", "tests/test_reliability.py", "tests/test_fuzz_readers.py",
    "tests/test_config.py",
    "tests/test_sharding.py::test_on_8_host_devices",
    "tests/test_sharding_context.py::test_on_8_host_devices",
    "tests/test_training.py::test_grads_match_torch_autograd[mamba1]",
    "tests/test_training.py::test_grads_match_torch_autograd[mamba2]",
    "tests/test_training.py::test_pallas_interpret_grads_equal_reference[mamba2]",
    "tests/test_training.py::test_checkpoint_resume_continues_identically",
    "tests/test_packing_kernels.py::test_conv_pallas_packed_equals_documents_alone",
    "tests/test_packing_kernels.py::test_model_pallas_packed_equals_documents_alone[mamba2]",
)


def _always_default(nodeid: str) -> bool:
    return any(nodeid == k or (k.endswith(".py") and nodeid.startswith(k + "::"))
               for k in ALWAYS_DEFAULT)
HEADER = """\
# Tests left out of the quicker tiers, by node id: the slowest of a timed run on a 2-core CPU.
# "slow": not in the quick tier (`pytest -m "not slow"`); "extended": not in the default tier
# either (the README's command; `pytest -m slow` runs both). Regenerate with
# tests/list_slow_tests.py (its docstring says how); conftest.py applies the marks.
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("log", help="output of pytest --durations=0")
    p.add_argument("--quick-s", type=float, default=170.0)
    p.add_argument("--default-s", type=float, default=1150.0)
    args = p.parse_args(argv)
    seconds: dict[str, float] = defaultdict(float)
    for line in Path(args.log).read_text().splitlines():
        if m := LINE.match(line):
            seconds[m.group(3)] += float(m.group(1))
    if not seconds:
        raise SystemExit(f"{args.log}: no durations found (run pytest with --durations=0)")
    total = sum(seconds.values())
    ranked = sorted(seconds.items(), key=lambda kv: -kv[1])
    marks = {}
    default = total  # the slowest tests not kept by ALWAYS_DEFAULT become extended first
    for nodeid, t in ranked:
        if default <= args.default_s:
            break
        if not _always_default(nodeid):
            marks[nodeid] = "extended"
            default -= t
    rest = default  # then the slowest of the rest become slow
    for nodeid, t in ranked:
        if rest <= args.quick_s:
            break
        if nodeid not in marks:
            marks[nodeid] = "slow"
            rest -= t
    OUT.write_text(HEADER + "".join(f"{marks[n]} {n}\n" for n in sorted(marks)))
    print(f"{len(seconds)} timed tests, {total:.0f} s: {len(marks)} slow, of them "
          f"{sum(m == 'extended' for m in marks.values())} extended; default tier {default:.0f} "
          f"s, quick tier {rest:.0f} s -> {OUT}")


if __name__ == "__main__":
    main()
