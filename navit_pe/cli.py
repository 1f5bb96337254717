"""Errors and checks shared by the command-line tools (train.py, eval_resolutions.py, sweeps).

Bad input raises `UsageError`; each tool's `main` prints it as one line and exits 2.
"""
from __future__ import annotations

import os
from pathlib import Path


class UsageError(ValueError):
    """Bad input: reported as one line, exit code 2."""


def check_out_dir(run: Path, flag: str = "--out") -> Path:
    """Create `run` if needed and prove it writable with a probe file (os.access says yes to root)."""
    run = Path(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write_test_{os.getpid()}"  # per process: ranks check at the same time
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to the output directory {run} ({e.strerror}); "
                         f"pass a writable {flag}") from None
    return run
