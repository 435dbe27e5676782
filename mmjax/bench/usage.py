"""CPU time and page faults of this process (no JAX import: the open_clip peer processes use it
too, and a user's open_clip process has no JAX runtime)."""

import resource

USAGE_KEYS = ("user_s", "sys_s", "minor_faults")


def process_usage() -> dict[str, float]:
    """CPU seconds in user and kernel mode and minor page faults this process has used so far.
    Differences over a timed block show what a step costs besides its own work: kernel time
    and page faults are what the allocator costs it (`mmjax.runtime`)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "sys_s": r.ru_stime, "minor_faults": float(r.ru_minflt)}


def usage_since(start: dict[str, float]) -> dict[str, float]:
    now = process_usage()
    return {k: now[k] - start[k] for k in USAGE_KEYS}
