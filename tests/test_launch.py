"""navit_pe/launch.py: `accelerate launch --num_processes N --cpu` becomes N processes under
torchrun, with the cores this process may use (its affinity, not the machine's count) shared out."""
from __future__ import annotations

import os

import pytest

from navit_pe import launch
from navit_pe.cli import ChildResult


@pytest.mark.parametrize("n, allowed, threads", [(2, {0, 1, 2, 3}, "2"), (2, {5}, "1"), (3, {0, 1, 2, 3, 4, 5, 6}, "2")])
def test_relaunch_shares_out_the_allowed_cores(monkeypatch, n, allowed, threads):
    for v in (*launch.DIST_VARS, "OMP_NUM_THREADS"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setattr(launch, "_parent_cmdline", lambda: ["python", "accelerate", "launch", "--num_processes", str(n),
                                                            "--cpu", "train.py"])
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine; the process may use `allowed`
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed, raising=False)
    seen = {}

    def fake_run_child(cmd, env):
        seen.update(cmd=cmd, env=env)
        return ChildResult(returncode=0, signum=0, cpu_s=0.0)

    monkeypatch.setattr(launch, "run_child", fake_run_child)
    with pytest.raises(SystemExit) as exit_:
        launch.relaunch_cpu_multiprocess()
    assert exit_.value.code == 0
    assert f"--nproc_per_node={n}" in seen["cmd"] and seen["env"]["OMP_NUM_THREADS"] == threads


def test_no_relaunch_without_the_cpu_flag_or_inside_a_distributed_run(monkeypatch):
    monkeypatch.setattr(launch, "_parent_cmdline", lambda: ["accelerate", "launch", "--num_processes", "2", "x.py"])
    monkeypatch.setattr(launch, "run_child", lambda *a, **k: pytest.fail("relaunched"))
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    launch.relaunch_cpu_multiprocess()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    launch.relaunch_cpu_multiprocess()
