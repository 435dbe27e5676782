"""Entry points re-execute once with the malloc tunable, and can be told not to."""

import os
import subprocess
import sys

CHILD = "import os; print(os.environ.get('GLIBC_TUNABLES'))"
PROBE = (
    "from mmjax import runtime; "
    f"runtime.reexec_with_malloc_tuning(['-c', {CHILD!r}]); "
    "print('not re-executed')"
)


def run_probe(**env):
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True
    )
    return out.stdout.strip()


def test_reexec_sets_the_tunable_once_and_keeps_existing_ones():
    if sys.platform != "linux":
        assert run_probe() == "not re-executed"
        return
    assert run_probe() == "glibc.malloc.hugetlb=1"
    assert run_probe(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    # Already set: no second exec.
    assert run_probe(GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == "not re-executed"


def test_tuning_can_be_turned_off():
    assert run_probe(MMJAX_MALLOC_TUNING="0") == "not re-executed"
