"""Sharing one machine's CPU between a server and a training run (the loop retrains beside `lmops serve`).

Measured before this module (issue 13): with other heavy processes on 2 cores, a training run asking
for a thread per core ran 5-20x slower than its share of the CPU predicts, because every PyTorch/OpenMP
thread spins between parallel regions waiting for work while the other process holds the core, and a
spinning thread burns the time slice the thread it waits for needs. So a background process:

- uses the cores it may actually run on: the CPU affinity mask (taskset, a container's cpuset) and the
  cgroup's CPU quota (a container limited to 1.5 CPUs gets 1 thread, not one per host core);
- tells OpenMP to sleep rather than spin when idle (OMP_WAIT_POLICY=PASSIVE; must be set before
  PyTorch starts its pool, which is why the CLI commands that retrain call `background` first);
- lowers its priority (nice), so the server's requests are scheduled first when both want a core.

`lmops loop` retrains this way always; `lmops train` and `lmops pipeline run` when an lmops server runs on
the same machine (`servers_here`, train.share_cpu: auto), or always or never as train.share_cpu says.

The server keeps its own settings: its latency is what matters, and at nice 0 it is scheduled first.

Measured with benchmarks/cpu_sharing.py (2 cores, `lmops serve` under 8 streaming clients; benchmarks/README.md,
"Training beside a live server"): at PyTorch's defaults a training run beside the server did 0.24-0.31 of its
alone work per CPU-second and the server's p95 rose 2.2-2.5x; with these settings 0.82-0.84, and p95 1.1-1.3x.
Spinning at nice 10 (libgomp's default, or GOMP_SPINCOUNT=20000) did 4-15x less than passive waits beside the
server. The price: alone, passive waits train at 0.6-0.75x the default's tokens/s.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

BACKGROUND_NICE = 10  # over a server's 0: it gets the cores first, training still progresses (19 starves it)
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """Cores this process may use: its affinity mask, capped by the cgroup v2 CPU quota (rounded down, at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def servers_here() -> list[int]:
    """The pids of the other processes on this machine that run an lmops server (`lmops serve`, `lmops
    endpoint serve`, `python -m lmops serve`), from their command lines in /proc; [] where there is no /proc."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode("utf-8", "replace").split("\0")
        except OSError:  # gone, or not ours to read
            continue
        for i, arg in enumerate(argv):
            if Path(arg).name == "lmops":  # the lmops script, or python's -m lmops
                rest = argv[i + 1:]
                if rest[:1] == ["serve"] or rest[:2] == ["endpoint", "serve"]:
                    found.append(pid)
                break
    return sorted(found)


def share_cpu(setting: str, threads: int | None, log=None) -> bool:
    """Apply train.share_cpu before PyTorch starts: background() when "always", or "auto" and an lmops server
    runs here (saying so through log). Returns whether it did."""
    servers = servers_here() if setting == "auto" else []
    if setting == "never" or (setting == "auto" and not servers):
        return False
    n = background(threads)
    if log is not None:
        why = f"an lmops server runs on this machine (pid {', '.join(map(str, servers[:3]))})" if servers else \
            "train.share_cpu: always"
        log(f"{why}: training in the background (nice {BACKGROUND_NICE}, OpenMP threads that sleep when idle, "
            f"{n} thread{'s' * (n != 1)}), so the server keeps its share of the CPU; train.share_cpu: never trains "
            "at full priority")
    return True


def background(threads: int | None = None, nice: int = BACKGROUND_NICE) -> int:
    """Make this process a polite background worker before PyTorch starts: OpenMP threads that sleep when
    idle, priority lowered to `nice` (never raised back), and PyTorch's thread count set to threads (default
    available_cores()). Returns the thread count."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")  # the same for Intel's OpenMP, should a build use it
    try:
        current = os.nice(0)
        if current < nice:
            os.nice(nice - current)
    except OSError:
        pass  # not permitted here: run at the priority given
    n = threads or available_cores()
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    import torch

    torch.set_num_threads(n)
    return n
