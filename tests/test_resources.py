"""Sharing the CPU with a server (lmops/resources.py): the cores a process may use, a background process's
settings (checked in a child process: they cannot be undone in this one), finding the lmops servers on
this machine, and `lmops train` going to the background beside one (train.share_cpu: auto)."""

import os
import subprocess
import sys
import time

import pytest
from conftest import TINY

from lmops import resources


def test_available_cores_is_the_affinity_mask_capped_by_the_cgroup_quota(tmp_path, monkeypatch):
    mine = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(resources, "CGROUP_CPU_MAX", quota)
    assert resources.available_cores() == mine, "no cgroup file: the affinity mask"
    quota.write_text("max 100000\n")
    assert resources.available_cores() == mine
    quota.write_text("150000 100000\n")  # 1.5 CPUs: one thread, not two
    assert resources.available_cores() == 1
    quota.write_text("50000 100000\n")
    assert resources.available_cores() == 1, "at least one"


def test_background_sleeps_idle_threads_lowers_priority_and_sets_threads_before_torch():
    code = ("import os, sys; from lmops.resources import background; assert 'torch' not in sys.modules; "
            "n = background(1); import torch; "
            "print(os.nice(0), os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert out == [str(max(resources.BACKGROUND_NICE, os.nice(0))), "PASSIVE", "1", "1"]


def stand_in(*argv: str) -> subprocess.Popen:
    """A process whose command line is an lmops command's: what servers_here reads (a real `lmops serve`
    would take seconds to start and a model to load, and is the same line in /proc)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *argv])
    time.sleep(0.2)
    return proc


@pytest.fixture
def processes():
    started = []
    yield lambda *argv: started.append(stand_in(*argv)) or started[-1]
    for p in started:
        p.kill()
        p.wait()


def test_servers_here_finds_lmops_servers_and_nothing_else(processes):
    serve = processes("/usr/local/bin/lmops", "serve", "--model", "m")
    endpoint = processes("-m", "lmops", "endpoint", "serve", "chat")
    others = [processes("/usr/local/bin/lmops", "train"), processes("-m", "lmops", "monitor", "run"),
              processes("serve", "lmops")]
    found = set(resources.servers_here())  # other tests' servers may be among them: checked by pid
    assert {serve.pid, endpoint.pid} <= found
    assert not found & {p.pid for p in others} and os.getpid() not in found


def test_share_cpu_does_nothing_when_never_or_when_no_server_runs(monkeypatch):
    called = []
    monkeypatch.setattr(resources, "background", lambda threads=None: called.append(threads) or 1)
    monkeypatch.setattr(resources, "servers_here", lambda: [])
    assert not resources.share_cpu("auto", None) and not resources.share_cpu("never", None)
    monkeypatch.setattr(resources, "servers_here", lambda: [4242])
    assert not resources.share_cpu("never", None) and not called
    lines = []
    assert resources.share_cpu("auto", 2, lines.append) and called == [2]
    assert "an lmops server runs on this machine (pid 4242): training in the background" in lines[0]
    assert resources.share_cpu("always", None, lines.append) and "train.share_cpu: always" in lines[1]


def test_lmops_train_beside_a_server_trains_in_the_background(workspace, processes):
    processes("/usr/local/bin/lmops", "serve")
    args = [sys.executable, "-m", "lmops", "train", "--workspace", str(workspace.root), "--no-progress"]
    for item in [*TINY, "train.max_steps=2"]:
        args += ["--set", item]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "an lmops server runs on this machine" in done.stdout + done.stderr
    assert "training in the background (nice 10" in done.stdout + done.stderr
