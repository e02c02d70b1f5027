"""What the bench scripts share: run a pipeline script in a child process and read its wall time and peak RSS."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# run a command, then print the peak RSS (KiB) of it and its children
MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "sys.exit(r.returncode)")


def run_measured(label: str, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of `python ARGS...` run from the repository root; exits if it fails."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, *args], capture_output=True, text=True,
                       cwd=ROOT)
    wall = time.time() - t0
    rss = next((int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("MAXRSS")), 0)
    if p.returncode != 0:
        sys.exit(f"{label} failed:\n{p.stdout}\n{p.stderr}")
    return wall, rss / 2**20
