"""Entry points re-execute once under the allocator setting (mimalloc, else a glibc tunable), it
does what it is there for (memory freed after a step is reused without page faults), and it can
be turned off or left to the user."""

import json
import os
import platform
import subprocess
import sys

import pytest

from mmjax import runtime

LINUX_GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
# Where pyproject.toml installs cmeel-mimalloc.
WITH_MIMALLOC = LINUX_GLIBC and platform.machine() in ("x86_64", "aarch64")
KEYS = ("LD_PRELOAD", "MIMALLOC_PURGE_DELAY", "GLIBC_TUNABLES")
# Runs only where the probe re-executes, i.e. on Linux: /proc is there.
CHILD = (
    "import json, os; "
    "maps = open('/proc/self/maps').read(); "
    f"print(json.dumps({{k: os.environ.get(k) for k in {KEYS!r}}} | "
    "{'mapped': 'libmimalloc' in maps}))"
)
PROBE = (
    "from mmjax import runtime; "
    f"runtime.reexec_with_malloc_tuning(['-c', {CHILD!r}]); "
    "print('not re-executed')"
)


def clean_env(**env):
    base = {k: v for k, v in os.environ.items() if k not in (*KEYS, runtime.TUNING_SWITCH)}
    return {**base, **env}


def run_probe(**env):
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=clean_env(**env), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip()
    return text if text == "not re-executed" else json.loads(text)


@pytest.mark.skipif(not WITH_MIMALLOC, reason="mimalloc is installed on x86_64/aarch64 Linux")
def test_reexec_preloads_mimalloc_once_and_keeps_the_users_settings():
    library = runtime.mimalloc_library()
    assert library is not None, "cmeel-mimalloc is a dependency here: pip install -e ."
    child = run_probe()
    assert child["LD_PRELOAD"] == library and child["mapped"]
    assert child["MIMALLOC_PURGE_DELAY"] == "-1" and child["GLIBC_TUNABLES"] is None
    # The user's own purge delay and preloaded libraries stay.
    child = run_probe(MIMALLOC_PURGE_DELAY="100", LD_PRELOAD="libm.so.6")
    assert child["MIMALLOC_PURGE_DELAY"] == "100" and child["LD_PRELOAD"] == f"{library}:libm.so.6"
    # Already under an allocator setting (ours, or a hugetlb tunable of the user's): no exec.
    assert run_probe(LD_PRELOAD=library) == "not re-executed"
    assert run_probe(GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == "not re-executed"


@pytest.mark.skipif(not LINUX_GLIBC, reason="the setting is for Linux with glibc only")
def test_glibc_fallback_sets_the_tunable_and_keeps_existing_ones(monkeypatch):
    # Where mimalloc is not installed, the default falls back to the tunable.
    monkeypatch.setattr(runtime, "mimalloc_library", lambda: None)
    fallback = runtime.tuned_environment(clean_env())
    assert fallback["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and "LD_PRELOAD" not in fallback
    child = run_probe(MMJAX_MALLOC_TUNING="glibc")
    assert child["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and not child["mapped"]
    child = run_probe(MMJAX_MALLOC_TUNING="glibc", GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert child["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_tuning_can_be_turned_off():
    assert run_probe(MMJAX_MALLOC_TUNING="0") == "not re-executed"


def test_a_misspelt_switch_is_an_error_before_anything_runs():
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=clean_env(MMJAX_MALLOC_TUNING="jemalloc"),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: MMJAX_MALLOC_TUNING='jemalloc' is not a setting; use one")


# Allocates, writes and frees a 256 MiB block five times (as XLA does with a step's
# temporaries) and prints the page faults of each round after the first.
REUSE = """
import ctypes, json, resource
libc = ctypes.CDLL(None)  # malloc as the process resolves it: the preloaded one, if any
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 256 << 20, []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults[1:]))
"""


def faults_per_round(env):
    out = subprocess.run(
        [sys.executable, "-c", REUSE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not WITH_MIMALLOC, reason="mimalloc is installed on x86_64/aarch64 Linux")
def test_the_preloaded_allocator_reuses_freed_memory_without_page_faults():
    """Why the setting exists: under glibc's defaults every round faults its block in again
    (65,536 pages of 4 KiB; 128 huge pages where transparent huge pages are always on); with the
    setting the second round on reuses the first one's memory (a few faults at most, for the
    interpreter's own allocations)."""
    plain = faults_per_round(clean_env(MMJAX_MALLOC_TUNING="0"))
    assert min(plain) >= (256 << 20) // (2 << 20), plain
    tuned = faults_per_round(runtime.tuned_environment(clean_env()))
    assert max(tuned) <= 8, tuned


def test_the_peer_environment_drops_only_our_setting():
    env = runtime.tuned_environment(clean_env(LD_PRELOAD="libm.so.6")) if LINUX_GLIBC else None
    env = env or {"LD_PRELOAD": "/x/libmimalloc.so:libm.so.6", "MIMALLOC_PURGE_DELAY": "-1"}
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    user = runtime.without_tuning(env)
    assert user["LD_PRELOAD"] == "libm.so.6" and "MIMALLOC_PURGE_DELAY" not in user
    assert user["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    assert runtime.allocator_in_use(user) == (
        "glibc (GLIBC_TUNABLES=glibc.malloc.arena_max=2), LD_PRELOAD=libm.so.6"
    )
    assert runtime.allocator_in_use(env) == "mimalloc (purge delay -1)"
    assert runtime.allocator_in_use({}) == "glibc (default)"
