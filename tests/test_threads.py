"""CPU threads: the cores this process may use, a launcher's share of them, the user's own settings, and fewer
threads while other processes hold cores."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_cli import threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cpu_max, cores",
    [(None, 2), ("max 100000\n", 2), ("100000 100000\n", 1), ("50000 100000\n", 1), ("800000 100000\n", 2)],
)
def test_usable_cores_are_the_affinity_within_a_cgroup_quota(monkeypatch, tmp_path, cpu_max, cores):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert threads.usable_cores(path) == cores


def test_prepare_shares_the_cores_and_keeps_the_users_settings(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    env = {"LOCAL_WORLD_SIZE": "2"}
    assert threads.prepare(env) == "4 threads, fewer while other processes hold cores, spin 10000"
    assert env["OMP_NUM_THREADS"] == "4" and env["GOMP_SPINCOUNT"] == threads.SPIN
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    assert threads.prepare(env) == "3 threads, passive (OMP_NUM_THREADS, OMP_WAIT_POLICY as given)"
    assert "GOMP_SPINCOUNT" not in env and env["OMP_NUM_THREADS"] == "3"
    env = {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2", "GRPO_NUM_THREADS": "3"}  # under a launcher
    assert threads.prepare(env) == "3 threads, spin 10000 (GRPO_NUM_THREADS as given)"
    assert threads.prepare({"LOCAL_WORLD_SIZE": "2"}) == "4 threads, fewer while other processes hold cores, spin 10000"


def test_the_cli_sets_threads_before_torch_loads():
    """Under a launcher with two processes on this machine (which sets its own OMP_NUM_THREADS): half the cores
    each, set before anything imported torch."""
    code = (
        "import os, sys; sys.argv = ['grpo', '--help']\n"
        "from grpo_cli import cli, threads\n"
        "prepare = threads.prepare\n"
        "threads.prepare = lambda: print('torch loaded before:', 'torch' in sys.modules) or prepare()\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "import torch; print(os.environ['GOMP_SPINCOUNT'], torch.get_num_threads())"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("OMP_", "GOMP_", "GRPO_"))}
    env |= {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "7"}  # the launcher's, not the user's
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert "torch loaded before: False" in result.stdout
    assert result.stdout.split()[-2:] == [threads.SPIN, str(threads.share(threads.usable_cores(), 2))]


STAT = """cpu  100 0 50 800 0 0 0 0 0 0
cpu0 60 0 20 400 5 1 1 2 0 0
cpu1 40 0 30 400 0 0 0 0 0 0
intr 1 2 3
"""


def test_ticks_from_proc():
    assert threads.cpu_ticks({0}, STAT) == (60 + 20 + 1 + 1 + 2, 60 + 20 + 400 + 5 + 1 + 1 + 2)
    assert threads.cpu_ticks({0, 1}, STAT)[0] == 84 + 70
    fake_self = "1234 (python (x) y) R " + " ".join(["0"] * 10) + " 7 5 0 0"
    assert threads.own_ticks(fake_self) == 12


def test_threads_follow_the_cores_other_processes_hold(monkeypatch):
    """Two cores: another process holding one takes a thread away, and its leaving gives it back."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("GRPO_THREADS_GIVEN", "")
    try:
        torch.set_num_threads(2)
        samples = iter([(0, 0, 0), (180, 200, 90), (360, 400, 180), (400, 600, 220), (0, 0, 0)])
        monkeypatch.setattr(threads.Adaptive, "sample", lambda self: next(samples))
        adapt = threads.Adaptive(every=0.0, most=2)
        adapt()  # we 90 ticks, the machine 180 of 200: the others held 0.9 of a core
        assert torch.get_num_threads() == 1
        adapt()  # the same again: no change
        assert torch.get_num_threads() == 1 and adapt.changes == 1
        adapt()  # the machine 40 of 200 ticks, all ours: the others left
        assert torch.get_num_threads() == 2 and adapt.changes == 2
        monkeypatch.setenv("GRPO_THREADS_GIVEN", "OMP_NUM_THREADS")
        assert not threads.Adaptive(every=0.0, most=2).on  # the user's own count is kept
    finally:
        torch.set_num_threads(before)


def test_the_hook_looks_at_each_forward_through_peft_and_generate(monkeypatch):
    """The load puts Adaptive on the base model as a forward pre-hook: it runs in the thread that runs torch, at
    every forward a PEFT model and generate make."""
    from peft import LoraConfig, get_peft_model

    from tests.fakes import tiny_llama

    looks = []
    monkeypatch.setattr(threads.Adaptive, "__call__", lambda self, *a, **kw: looks.append(1))
    model = tiny_llama().eval()
    model.register_forward_pre_hook(threads.Adaptive())
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    model.generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert len(looks) == 4  # the prompt, then each new token after the first
