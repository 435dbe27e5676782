"""Process settings that have to be in place before the interpreter starts: the memory allocator.

XLA's CPU runtime allocates each step's temporaries (hundreds of MB) afresh and frees them at the
end of the step. glibc's malloc hands memory that large back to the kernel (an `munmap`, or a
thread arena's heap deleted once it is empty), so the next step takes the page faults again and
the kernel zeroes every page anew: a quarter of the CPU time of a training step here, more on a VM
whose host reclaims freed guest memory. mimalloc (the `cmeel-mimalloc` wheel, a dependency on
x86_64 and aarch64 Linux), preloaded with its purging off, keeps the freed memory in the process
and serves the next step from it: ~0 page faults per step. Measured on the 2-core CPU host, the
default run 4 min 48 s -> 3 min 41 s with the same metrics, peak RSS 2.4 -> 3.1 GB (README,
Performance).

Without mimalloc (not installed, or `MMJAX_MALLOC_TUNING=glibc`) the entry points fall back to
glibc's tunable `glibc.malloc.hugetlb=1`: transparent huge pages, ~200x fewer faults than 4 KiB
pages but still ~480 per step. Both are read only at start-up, so the entry points re-execute
themselves once with them set. `MMJAX_MALLOC_TUNING=0` turns all of it off; a
`MIMALLOC_PURGE_DELAY` of the user's own is kept. Other platforms are left alone.
"""

import importlib.metadata
import os
import platform
import sys

GLIBC_TUNABLE = "glibc.malloc.hugetlb=1"
# -1: never return freed memory to the kernel (mimalloc's default returns it after 10 ms, which
# brings the faults back: ~200 per step of the benchmark model).
MIMALLOC_SETTINGS = {"MIMALLOC_PURGE_DELAY": "-1"}
TUNING_SWITCH = "MMJAX_MALLOC_TUNING"
CHOICES = {
    "1": "mimalloc, else glibc's tunable (the default)",
    "glibc": "glibc's tunable",
    "0": "off",
}


def _preloads_mimalloc(environ) -> bool:
    return "libmimalloc" in environ.get("LD_PRELOAD", "")


def _without(environ: dict[str, str], key: str, drop) -> None:
    """Removes the `:`-separated entries of `environ[key]` that `drop` picks (the key too, if
    nothing is left)."""
    kept = ":".join(e for e in environ.get(key, "").split(":") if e and not drop(e))
    if kept:
        environ[key] = kept
    else:
        environ.pop(key, None)


def mimalloc_library() -> str | None:
    """Path of the installed `cmeel-mimalloc` shared library, or None where it is not installed."""
    try:
        files = importlib.metadata.files("cmeel-mimalloc") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    # The wheel holds the library three times (.so, .so.3, .so.3.4); any of them will do.
    for file in sorted(files, key=str):
        path = file.locate()
        if os.path.basename(str(file)).startswith("libmimalloc.so") and os.path.isfile(path):
            return os.path.realpath(path)
    return None


def allocator_in_use(environ: dict[str, str] | None = None) -> str:
    """Names the allocator setting a process started with `environ` (default: this one's) runs
    under: `mimalloc (purge delay -1)`, `glibc (GLIBC_TUNABLES=...)` or `glibc (default)`; a
    library of the user's own preloaded is named after it (it may replace malloc)."""
    environ = os.environ if environ is None else environ
    preload = environ.get("LD_PRELOAD", "")
    if _preloads_mimalloc(environ):
        return f"mimalloc (purge delay {environ.get('MIMALLOC_PURGE_DELAY', 'default')})"
    tunables = environ.get("GLIBC_TUNABLES", "")
    glibc = f"glibc ({'GLIBC_TUNABLES=' + tunables if tunables else 'default'})"
    return f"{glibc}, LD_PRELOAD={preload}" if preload else glibc


def without_tuning(environ: dict[str, str]) -> dict[str, str]:
    """`environ` as a process of the user's own would have it: no allocator setting of ours (the
    benchmark's open_clip peer). Other preloaded libraries and tunables stay."""
    env = {k: v for k, v in environ.items() if k not in MIMALLOC_SETTINGS}
    _without(env, "LD_PRELOAD", lambda library: "libmimalloc" in library)
    _without(env, "GLIBC_TUNABLES", lambda tunable: tunable == GLIBC_TUNABLE)
    return env


def tuned_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None where nothing is to change: tuning off, not
    Linux with glibc, or the process already runs under an allocator setting (ours or the user's:
    mimalloc preloaded, or a `glibc.malloc.hugetlb` tunable of their own). Raises ValueError
    for a value of MMJAX_MALLOC_TUNING other than those in CHOICES."""
    choice = environ.get(TUNING_SWITCH, "1")
    if choice not in CHOICES:
        allowed = "; ".join(f"{k}: {v}" for k, v in CHOICES.items())
        raise ValueError(f"{TUNING_SWITCH}={choice!r} is not a setting; use one of {allowed}")
    if choice == "0" or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if _preloads_mimalloc(environ) or "glibc.malloc.hugetlb" in tunables:
        return None
    library = mimalloc_library() if choice != "glibc" else None
    if library is not None:
        preload = ":".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
        return {**MIMALLOC_SETTINGS, **environ, "LD_PRELOAD": preload}
    return dict(environ, GLIBC_TUNABLES=":".join(t for t in (tunables, GLIBC_TUNABLE) if t))


def reexec_with_malloc_tuning(argv: list[str]) -> None:
    """Replaces this process by `python *argv` under the allocator setting above, unless there is
    nothing to change (then it returns at once). A bad MMJAX_MALLOC_TUNING exits with code 2
    and one `error:` line, before anything starts."""
    try:
        env = tuned_environment(dict(os.environ))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
