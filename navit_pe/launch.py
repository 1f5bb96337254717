"""Make `accelerate launch --num_processes N --cpu script.py` start N processes.

Accelerate starts several CPU processes only through MPI (`--mpirun_hostfile`); without it,
`--num_processes 2 --cpu` silently runs a single process. When a script finds itself in that
situation (Accelerate's CPU flag set, no distributed environment, and the launching
`accelerate launch` asked for N > 1 processes), it re-starts itself under
`torch.distributed.run` with N processes on this machine, which Accelerate picks up as
MULTI_CPU (gloo). Any other launch is left alone.
"""
from __future__ import annotations

import os
import sys

from .cli import run_child
from .cpu import cores

DIST_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def requested_processes(parent_cmdline: list[str]) -> int:
    """N from an `accelerate launch ... --num_processes N ...` command line, else 1."""
    if not any("accelerate" in part for part in parent_cmdline[:3]):
        return 1
    for i, arg in enumerate(parent_cmdline):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(parent_cmdline):
                return int(parent_cmdline[i + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
    return 1


def _parent_cmdline() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [p.decode(errors="replace") for p in f.read().split(b"\0") if p]
    except OSError:
        return []


def relaunch_cpu_multiprocess() -> None:
    """If launched by `accelerate launch --num_processes N --cpu` as one process, become N."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1", "yes"):
        return
    if any(v in os.environ for v in DIST_VARS):
        return
    n = requested_processes(_parent_cmdline())
    if n <= 1:
        return
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores() // n)))
    # on a signal torchrun passes it on, then kills the processes after this many seconds (torch
    # 2.13's torchrun reads it; older ones wait 30 s): time to finish a step, an evaluation, a checkpoint
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    print(f"accelerate runs CPU processes only through MPI; starting {n} processes with "
          f"torch.distributed.run", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           sys.argv[0], *sys.argv[1:]]
    sys.exit(run_child(cmd, env=env).returncode)  # a signal reaches the processes, which checkpoint and stop
