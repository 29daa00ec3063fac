"""What a stage of a job costs: seconds, and the process's peak resident memory. Reported by the
data and text tasks and by every worker, so a user sees where memory and time go as data grows
(and `bench/scale.py` reads the same numbers)."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (ru_maxrss: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)
