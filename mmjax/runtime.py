"""Process settings that have to be in place before the interpreter starts.

XLA's CPU runtime allocates each step's temporaries (hundreds of MB) afresh, and glibc's malloc
serves allocations that large with a new `mmap`: every step then takes one page fault per 4 KiB
page it touches (~93k faults per step of the benchmark model, a fifth of its time). With the
tunable `glibc.malloc.hugetlb=1` malloc asks for transparent huge pages, which cuts the faults
~200-fold (measured: 303 -> 227 ms per bf16 step, 330 -> 273 ms fp32; README, Performance).
glibc reads tunables only at start-up, so the entry points re-execute themselves once with it
set. `MMJAX_MALLOC_TUNING=0` turns this off; other platforms and C libraries are left alone.
"""

import os
import platform
import sys

MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def reexec_with_malloc_tuning(argv: list[str]) -> None:
    """Replaces this process by `python *argv` with the malloc tunable set, unless it is set
    already (then it returns at once), disabled, or the platform is not Linux with glibc."""
    if os.environ.get("MMJAX_MALLOC_TUNING", "1") == "0" or sys.platform != "linux":
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or platform.libc_ver()[0] != "glibc":
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, MALLOC_TUNABLE) if t))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
