"""Never lose a run: misbehaving rewards, a non-finite loss, one live run per folder, checkpoints to trust."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from grpo_cli import runs
from grpo_cli.adapter import occupied
from grpo_cli.errors import GrpoError
from rewards import RewardError, checked


def test_a_reward_past_its_timeout_stops_with_its_name():
    def slow_reward(prompts, completions, **kwargs):
        time.sleep(30)

    with pytest.raises(RewardError, match=r"reward slow_reward took longer than 0.2s on 2 completions: make it faster"):
        checked(slow_reward, timeout=0.2)(prompts=["p", "p"], completions=["a", "b"])


def test_a_reward_that_catches_everything_still_times_out_and_its_own_timeout_is_its_own():
    def swallowing(prompts, completions, **kwargs):
        try:
            time.sleep(30)
        except Exception:
            return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward swallowing took longer than 0.2s"):
        checked(swallowing, timeout=0.2)(prompts=["p"], completions=["a"])

    def own_timeout(prompts, completions, **kwargs):
        raise TimeoutError("the grader's server did not answer")

    with pytest.raises(RewardError, match=r"reward own_timeout raised TimeoutError: the grader's server did not"):
        checked(own_timeout, timeout=5)(prompts=["p"], completions=["a"])
    fired = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: fired.append(a))
    try:
        assert checked(lambda prompts, completions: [1.0], timeout=0.05)(prompts=["p"], completions=["a"]) == [1.0]
        assert signal.getsignal(signal.SIGUSR1) is not None and not fired
        time.sleep(0.1)  # the cancelled timer never interrupts what runs after the call
        assert not fired
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_nan_reward_is_an_error_naming_the_completion_unless_skipped():
    def shaky(prompts, completions, **kwargs):
        return [1.0 if c == "fine" else math.nan for c in completions]

    with pytest.raises(RewardError, match=r"reward shaky returned nan on 'odd one': return finite numbers, or set"):
        checked(shaky)(prompts=["p"] * 2, completions=["fine", "odd one"])
    skipping = checked(shaky, nan="skip")
    assert skipping(prompts=["p"] * 3, completions=["fine", "odd", "x"]) == [1.0, None, None]
    assert skipping.skipped == 2


def test_a_non_finite_loss_stops_before_backward(monkeypatch):
    import trl

    from grpo_cli.config import Settings
    from grpo_cli.plan import Machine, resolve
    from grpo_cli.trainer import trainer_class

    for machine in (Machine(), Machine(cuda=True)):
        trainer = object.__new__(trainer_class(resolve(Settings(), machine)))
        monkeypatch.setattr(trl.GRPOTrainer, "compute_loss", lambda self, *a, **kw: torch.tensor(float("nan")))
        with pytest.raises(runs.NumericError, match="the loss is nan: lower --learning-rate"):
            trainer.compute_loss(None, {})
        monkeypatch.setattr(trl.GRPOTrainer, "compute_loss", lambda self, *a, **kw: torch.tensor(0.5))
        assert trainer.compute_loss(None, {}).item() == 0.5


@pytest.mark.parametrize(
    "exc, code", [(RewardError("r"), 3), (runs.NumericError("n"), 4), (torch.OutOfMemoryError("o"), 5), (KeyError(), 1)]
)
def test_each_failure_has_its_exit_code(exc, code):
    assert runs.failure_kind(exc)[1] == code


RUN = """
import sys
from grpo_cli import runs
print("ready", flush=True)
sys.stdin.readline()  # the start, given to every run at once
try:
    lock = runs.acquire_lock(sys.argv[1])
except Exception as exc:
    print(exc, flush=True)
    raise SystemExit(1)
print("won", flush=True)
sys.stdin.readline()  # holds the folder until told to finish
runs.release_lock(lock)
"""


def start_runs(folder, n=1):
    """``n`` processes that take ``folder``'s lock at the same moment; each says "won" or why not on its first line
    of output, and a winner holds the folder until its stdin gets a line."""
    procs = [subprocess.Popen([sys.executable, "-c", RUN, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]  # fmt: skip
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * n
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    return procs


def test_two_runs_racing_for_a_folder_one_wins_and_the_other_names_it(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for race in range(3):
        folder = tmp_path / str(race)
        folder.mkdir()
        (folder / runs.LOCK).write_text(json.dumps({"pid": gone.pid, "started": time.time()}))  # a killed run's
        racers = start_runs(folder, 2)
        try:
            said = [r.stdout.readline() for r in racers]
            winners = [r for r, s in zip(racers, said) if s == "won\n"]
            assert len(winners) == 1, said
            (refusal,) = [s for s in said if s != "won\n"]
            assert re.match(rf"{folder} is in use by another grpo train \(PID {winners[0].pid}, started ", refusal)
        finally:
            rest = [r.communicate("\n", timeout=60)[0] for r in racers]
        assert rest == ["", ""] and sorted(r.returncode for r in racers) == [0, 1]


def test_a_killed_run_lets_its_folder_go_with_no_stale_lock_to_remove(tmp_path, capsys):
    (run,) = start_runs(tmp_path)
    assert run.stdout.readline() == "won\n"
    run.kill()
    run.wait()
    lock = runs.acquire_lock(tmp_path)
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / runs.LOCK).read_text())["pid"] == os.getpid()
    runs.release_lock(lock)
    assert not (tmp_path / runs.LOCK).exists() and not occupied(tmp_path)


def test_a_lock_file_naming_a_live_process_but_unlocked_does_not_hold_the_folder(tmp_path, capsys):
    # a killed run's PID, now another process's
    (tmp_path / runs.LOCK).write_text(json.dumps({"pid": os.getppid(), "started": time.time()}))
    lock = runs.acquire_lock(tmp_path)
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / runs.LOCK).read_text())["pid"] == os.getpid()
    runs.check_lock(tmp_path)  # this process's own lock, held on another open file, does not refuse it
    runs.release_lock(lock)
    assert not (tmp_path / runs.LOCK).exists()


def test_a_live_run_holds_its_folder_until_it_ends(tmp_path):
    (run,) = start_runs(tmp_path)
    try:
        assert run.stdout.readline() == "won\n"
        with pytest.raises(GrpoError, match=rf"is in use by another grpo train \(PID {run.pid}, started .*\): wait"):
            runs.check_lock(tmp_path)
        result = subprocess.run(
            [sys.executable, "-m", "grpo_cli", "train", "--output-dir", str(tmp_path)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 2 and f"(PID {run.pid}, started" in result.stderr
    finally:
        run.kill()
        run.wait()
    # its PID, now another process's
    (tmp_path / runs.LOCK).write_text(json.dumps({"pid": os.getppid(), "started": time.time()}))
    runs.check_lock(tmp_path)


def test_a_folder_that_cannot_be_made_is_refused_with_the_fix(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(GrpoError, match=r"cannot create .*file/run \(Not a directory\): give an --output-dir you"):
        runs.acquire_lock(tmp_path / "file" / "run")


def checkpoint(root, step, weights=b""):
    from safetensors.torch import save_file

    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "adapter_config.json").write_text("{}")
    save_file({"lora_A": torch.ones(4, 4)}, path / "adapter_model.safetensors")
    return path


def test_resume_skips_a_truncated_or_unreadable_checkpoint(tmp_path, capsys):
    checkpoint(tmp_path, 1)
    truncated = checkpoint(tmp_path, 2)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    (checkpoint(tmp_path, 3) / "trainer_state.json").write_text("{not json")
    assert runs.latest_good_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    out = capsys.readouterr().out
    assert "Skipping checkpoint-3: trainer_state.json does not parse" in out
    assert "Skipping checkpoint-2: adapter_model.safetensors does not read" in out


def test_resume_refuses_a_change_of_meaning_unless_asked(tmp_path):
    from grpo_cli.adapter import write_json
    from grpo_cli.config import Settings
    from grpo_cli.runs import resume_point

    before = Settings()
    before.train.output_dir = str(tmp_path)
    write_json(tmp_path / "grpo.json", {"settings": before.to_dict()})
    checkpoint(tmp_path, 1)
    now = Settings()
    now.train.output_dir, now.train.num_generations, now.data.rewards = str(tmp_path), 4, ["answer_tag"]
    with pytest.raises(GrpoError, match=r"would change what .* trains \(rewards: .* -> \['answer_tag'\]; "
                                        r"num_generations: 6 -> 4\): drop those settings"):  # fmt: skip
        resume_point(now, True, resume_anyway=False)
    assert resume_point(now, True, resume_anyway=True) == str(tmp_path / "checkpoint-1")
    before.train.max_steps = 500  # more steps is what a resume is for
    assert resume_point(before, True, resume_anyway=False) == str(tmp_path / "checkpoint-1")
