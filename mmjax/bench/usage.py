"""CPU time and page faults of this process, and the load of other processes on the machine (no
JAX import: the open_clip peer processes use it too, and a user's open_clip process has no JAX
runtime)."""

import os
import resource
import time

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


def cpu_clock() -> tuple[float, float, float] | None:
    """(wall s, CPU s all processes spent busy, CPU s of this process); None off Linux. Two
    readings give how many cores *other* processes kept busy in between: the load that makes
    timings noisy (a load average cannot tell it from this benchmark's own threads)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user .. steal
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    own = process_usage()
    return time.perf_counter(), busy, own["user_s"] + own["sys_s"]


def other_cores(start, end, children_cpu_s: float = 0.0) -> float | None:
    """Cores kept busy between two `cpu_clock` readings by processes other than this one and
    its peer processes (which report their own CPU seconds, `children_cpu_s`)."""
    if start is None or end is None:
        return None
    wall, busy, own = (b - a for a, b in zip(start, end, strict=True))
    return max(busy - own - children_cpu_s, 0.0) / wall
