"""Errors, checks and child processes shared by the command-line tools (train.py,
eval_resolutions.py, sweeps, the study).

Bad input raises `UsageError`; each tool's `main` prints it as one line and exits 2.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass
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


# children of run_child still running, and the last signal passed on to them (0: none)
_live: set[subprocess.Popen] = set()
_live_lock = threading.RLock()  # re-entrant: the handler runs in the main thread, which may hold it
_forwarding = {"on": False, "signum": 0}


def _forward(signum, frame) -> None:
    _forwarding["signum"] = signum
    with _live_lock:  # a child in _live is running or an unreaped zombie: its pid is still its own
        for proc in _live:
            os.kill(proc.pid, signum)


@contextmanager
def forward_signals():
    """While inside: SIGTERM and SIGINT are passed on to every child that run_child is waiting for,
    in any thread, instead of acting on this process (train.py then checkpoints and stops).
    Main thread only; elsewhere, or nested, it leaves the handlers as they are."""
    if threading.current_thread() is not threading.main_thread() or _forwarding["on"]:
        yield
        return
    _forwarding.update(on=True, signum=0)
    saved = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        _forwarding["on"] = False


def signal_forwarded() -> int:
    """The last signal passed on to the children in the current forward_signals (0: none, or outside it)."""
    return _forwarding["signum"] if _forwarding["on"] else 0


@dataclass
class ChildResult:
    returncode: int
    signum: int  # the last signal passed on since forward_signals began (0: none)
    cpu_s: float  # its CPU seconds (user + system), its own waited-for children included


def run_child(cmd: list[str], **popen_kw) -> ChildResult:
    """Run `cmd` and wait for it, inside forward_signals: a signal goes on to the child and this
    process waits until the child has finished, instead of killing it as subprocess.call would."""
    with forward_signals():
        with _live_lock:
            proc = subprocess.Popen(cmd, **popen_kw)
            _live.add(proc)
            if signal_forwarded():  # it came while the child was starting
                proc.send_signal(signal_forwarded())
        try:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # until it ends, without reaping it
        finally:
            with _live_lock:  # no signal goes to its pid from now on
                _live.discard(proc)
        _, status, usage = os.wait4(proc.pid, 0)  # reap it: this child's own CPU time, not its siblings'
        proc.returncode = os.waitstatus_to_exitcode(status)
        return ChildResult(proc.returncode, signal_forwarded(), usage.ru_utime + usage.ru_stime)
