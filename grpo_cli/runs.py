"""A run's folder: one live run at a time, checkpoints that can be trusted, and what a failure leaves behind."""

import json
import os
import re
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from grpo_cli.errors import GrpoError

LOCK = ".grpo.lock"
ERROR_LOG = "error.log"
CHECKPOINT_FILES = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors")
# a resume that changes these trains something else than the run it continues
STEP = re.compile(r"checkpoint-(\d+)$")
MEANING = {"model": ["model"], "data": ["dataset", "rewards"], "train": ["num_generations"]}


class RunFailed(Exception):
    """Training stopped on an error after the run began; what it completed is saved. ``code`` is the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class NumericError(RuntimeError):
    """The loss is NaN or infinite."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_lock(output_dir: Path) -> None:
    """Refuse a folder that a live run holds (read only: nothing is written yet)."""
    holder = read_lock(Path(output_dir) / LOCK)
    if holder and holder["pid"] != os.getpid() and _alive(holder["pid"]):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        raise GrpoError(
            f"{output_dir} is in use by another grpo train (PID {holder['pid']}, started {started}): "
            "wait for it, stop it, or give another --output-dir"
        )


def acquire_lock(output_dir: Path) -> Path:
    """Claim the folder for this process; refuse if another live run holds it, take over a stale lock."""
    lock = Path(output_dir) / LOCK
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GrpoError(f"cannot create {output_dir} ({exc.strerror}): give an --output-dir you can write to") from exc
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            check_lock(output_dir)
            holder = read_lock(lock)
            print(f"Removing a stale lock in {output_dir} (its run, PID {holder['pid'] if holder else '?'}, is gone)")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "started": time.time()}, f)
        return lock


def read_lock(lock: Path) -> dict | None:
    try:
        holder = json.loads(Path(lock).read_text())
        return holder if isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError, AttributeError):
        return None


def release_lock(lock: Path) -> None:
    holder = read_lock(lock)
    if holder and holder["pid"] == os.getpid():
        lock.unlink(missing_ok=True)


def broken(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a missing file, a trainer state or weights that do not read), or
    None when it is whole."""
    from safetensors import safe_open

    missing = [name for name in CHECKPOINT_FILES if not (checkpoint / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json does not parse"
    try:
        with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as weights:
            for name in weights.keys():
                weights.get_tensor(name)
    except Exception as exc:  # safetensors raises its own error types for a truncated or corrupt file
        return f"adapter_model.safetensors does not read ({str(exc).splitlines()[0][:80]})"
    return None


def latest_good_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint that is whole; each broken one newer than it is named and passed over."""
    found = {int(m[1]): p for p in Path(output_dir).glob("checkpoint-*") if (m := STEP.match(p.name)) and p.is_dir()}
    for _, checkpoint in sorted(found.items(), reverse=True):
        why = broken(checkpoint)
        if why is None:
            return str(checkpoint)
        print(f"Skipping {checkpoint.name}: {why}")
    return None


def changed_meaning(saved: dict, settings: dict) -> list[str]:
    """The settings whose change would make a resumed run train something else: 'name: before -> now'."""
    return [
        f"{key}: {saved[section][key]!r} -> {settings[section][key]!r}"
        for section, keys in MEANING.items()
        for key in keys
        if key in saved.get(section, {}) and saved[section][key] != settings[section][key]
    ]


def failure_kind(exc: BaseException) -> tuple[str, int]:
    """A class of failure and its exit code: 3 a reward, 4 a NaN or infinite loss, 5 out of memory, 1 other."""
    import torch

    from rewards import RewardError

    if isinstance(exc, RewardError):
        return "a reward failed", 3
    if isinstance(exc, NumericError):
        return "the loss is not finite", 4
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out of memory", 5
    return "training failed", 1


def write_error_log(output_dir: Path, exc: BaseException) -> Path:
    path = Path(output_dir) / ERROR_LOG
    path.write_text("".join(traceback.format_exception(exc)))
    return path


def save_checkpoint(trainer, output_dir: Path) -> Path | None:
    """Checkpoint the last completed step (the weights and optimizer are that step's until the next optimizer
    step), written beside the run and renamed into place whole. None when no step completed."""
    step = trainer.state.global_step
    if step == 0:
        return None
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.is_dir() and broken(final) is None:
        return final
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=".checkpoint-"))
    run_dir = trainer.args.output_dir
    try:
        trainer.args.output_dir = str(tmp)
        trainer._save_checkpoint(trainer.model, trial=None)
        shutil.rmtree(final, ignore_errors=True)
        (tmp / final.name).rename(final)
    finally:
        trainer.args.output_dir = run_dir
        shutil.rmtree(tmp, ignore_errors=True)
    return final
