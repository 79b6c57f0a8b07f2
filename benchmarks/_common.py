"""Helpers shared by the benchmarks: each arm runs in its own process, so that its
peak memory is its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB. Not `ru_maxrss`: Linux
    carries that over fork and exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_arm(script: str, arm: str, *args: str) -> dict | None:
    """Run `script --arm ARM ARGS…` in a fresh interpreter → the JSON dict it prints
    last, or None (with its stderr shown) when it fails."""
    r = subprocess.run([sys.executable, script, "--arm", arm, *args], capture_output=True, text=True)
    if r.returncode:
        print(f"{arm} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])
