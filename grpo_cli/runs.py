"""A run's folder: one live run at a time, checkpoints that can be trusted, and what a failure leaves behind."""

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import IO

from grpo_cli import dist, report
from grpo_cli.adapter import occupied, read_manifest, save_adapter
from grpo_cli.config import Settings
from grpo_cli.errors import GrpoError

LOCK = ".grpo.lock"
ERROR_LOG = "error.log"
CHECKPOINT_FILES = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors")
# a resume that changes these trains something else than the run it continues
STEP = re.compile(r"checkpoint-(\d+)$")
MEANING = {
    "model": ["model"],
    "data": ["dataset", "rewards", "task_settings", "difficulty", "curriculum"],
    "train": ["num_generations"],
}


class RunFailed(Exception):
    """Training stopped on an error after the run began; what it completed is saved. ``code`` is the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class NumericError(RuntimeError):
    """The loss is NaN or infinite."""


def check_lock(output_dir: Path) -> None:
    """Refuse a folder that a live run holds (read only: nothing is written yet)."""
    lock = Path(output_dir) / LOCK
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return  # no lock file: no run holds the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: the checks of a launch's processes do not collide
    except BlockingIOError:
        holder = _holder(lock)
        if not (holder and holder["pid"] == os.getpid()):  # this process's own lock is held on another open file
            raise _in_use(output_dir, holder) from None
    finally:
        os.close(fd)


def acquire_lock(output_dir: Path) -> IO[str]:
    """Claim the folder for this process, or refuse it while another run holds it. The operating system lets the lock
    go when its process ends, however it ends: a killed run's lock is free, its leftover file reused. Keep the
    returned file open for the run's life, and give it to release_lock."""
    lock = Path(output_dir) / LOCK
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            f = open(lock, "a+")  # created when missing, emptied only once it is this run's
        except OSError as exc:
            raise GrpoError(
                f"cannot create {output_dir} ({exc.strerror}): give an --output-dir you can write to"
            ) from exc
        deadline = time.monotonic() + 1  # another launch's check_lock holds it shared for an instant; a run, for good
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                f.close()
                raise _in_use(output_dir, _holder(lock)) from None
            except OSError as exc:
                f.close()
                raise GrpoError(
                    f"cannot lock {lock} ({exc.strerror}): give an --output-dir on a file system with file locks"
                ) from exc
        if _same_file(lock, f):
            break
        f.close()  # the run that held it removed the file while this one opened it: lock the new file
    f.truncate(0)
    json.dump({"pid": os.getpid(), "started": time.time()}, f)
    f.flush()
    return f


def read_lock(lock: Path) -> dict | None:
    try:
        holder = json.loads(Path(lock).read_text())
        return holder if isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError, AttributeError):
        return None


def release_lock(lock: IO[str]) -> None:
    """Remove the lock file, then let the lock go, so that a finished run's folder keeps no lock file."""
    if _same_file(Path(lock.name), lock):  # not a file that another run made after this one's was deleted
        Path(lock.name).unlink()
    lock.close()


def _same_file(path: Path, f: IO[str]) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(f.fileno()))
    except FileNotFoundError:
        return False


def _holder(lock: Path) -> dict | None:
    """The run that holds the lock, as it wrote itself into the file; waits a moment for one that has just taken it."""
    deadline = time.monotonic() + 1
    while (holder := read_lock(lock)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return holder


def _in_use(output_dir: Path, holder: dict | None) -> GrpoError:
    pid, started = "unknown", "unknown"
    if holder:
        pid = holder["pid"]
        if isinstance(holder.get("started"), (int, float)):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
    return GrpoError(
        f"{output_dir} is in use by another grpo train (PID {pid}, started {started}): "
        "wait for it, stop it, or give another --output-dir"
    )


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


# The run folder's life: checked, resumed or claimed, and rescued when a step fails


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    if occupied(output_dir) and not (resume or overwrite):
        raise GrpoError(
            f"output directory {output_dir} is not empty: pass --resume latest to continue it, "
            "--overwrite to replace it, or another --output-dir"
        )


def resume_point(settings: Settings, resume: str | bool, resume_anyway: bool) -> str | None:
    """The checkpoint to continue from (the newest whole one for ``latest``), refusing a resume whose settings
    would train something else than the run it continues."""
    output_dir = Path(settings.train.output_dir)
    checkpoint = (latest_good_checkpoint(output_dir) if resume is True else resume) or None
    if resume and (checkpoint is None or not Path(checkpoint).is_dir()):
        raise GrpoError(
            f"--resume: no checkpoint {checkpoint or 'checkpoint-N'} in {output_dir}: start a new run with --overwrite"
        )
    if checkpoint and resume is not True and (why := broken(Path(checkpoint))):
        raise GrpoError(f"--resume: {checkpoint} is not whole ({why}): use --resume latest or another checkpoint")
    saved = read_manifest(output_dir).get("settings") if checkpoint else None
    changes = changed_meaning(saved, settings.to_dict()) if saved else []
    if changes and not resume_anyway:
        raise GrpoError(
            f"--resume would change what {output_dir} trains ({'; '.join(changes)}): "
            "drop those settings, start a new --output-dir, or pass --resume-anyway"
        )
    return checkpoint


def claim(output_dir: Path, overwrite: bool):
    """The main process takes the run's lock and, with --overwrite, removes the old run only now that the new one
    has loaded; the others wait for it, so none writes into the folder before that."""
    lock = None
    if dist.is_main():
        lock = acquire_lock(output_dir)
        if overwrite:
            for path in output_dir.iterdir():
                if path.name != LOCK:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return lock  # dist.agree, which calls this, holds the others until it is done


def rescue(trainer, model, manifest: dict, output_dir: Path, failure: Exception) -> RunFailed:
    """After a failure mid-step: the last completed step as a checkpoint and the adapter, the plot, the traceback
    in error.log; returns the one-line error to raise, with its exit code."""
    kind, code = failure_kind(failure)
    cause = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    if not dist.is_main():
        return RunFailed(f"{dist.process_name()}: {kind} at step {trainer.state.global_step + 1}: {cause}", code)
    log = write_error_log(output_dir, failure)
    if dist.world_size() > 1:  # saving takes every process, and the others may have stopped or be waiting elsewhere
        last = latest_good_checkpoint(output_dir)
        again = f"grpo train --resume latest --output-dir {output_dir}" if last else "grpo train --overwrite ..."
        kept = f"{Path(last).name} is the last checkpoint" if last else "no checkpoint was saved yet"
        return RunFailed(
            f"{kind} at step {trainer.state.global_step + 1}: {cause}; {kept}; traceback in {log}; fix the cause, "
            f"then: {again}",
            code,
        )
    for callback in trainer.callback_handler.callbacks:  # the progress bar would hold the terminal
        if getattr(callback, "progress", None) is not None:
            callback.progress.stop()
    if code == 5:  # the failed step's tensors live on in the traceback's frames: free them before saving
        import gc

        import torch

        traceback.clear_frames(failure.__traceback__)
        gc.collect()
        torch.cuda.empty_cache()  # a no-op where CUDA was never initialized
    step = trainer.state.global_step
    checkpoint = None
    try:
        checkpoint = save_checkpoint(trainer, output_dir)
        saved = "nothing to save (no step completed)"
        if checkpoint is not None:
            history = [h for h in trainer.state.log_history if "reward" in h]
            manifest.update(step=step, last_reward=history[-1]["reward"] if history else None)
            adapter = save_adapter(model, output_dir / "adapter", manifest, force=True)
            report.plot(output_dir)
            saved = f"saved {checkpoint.name} and the adapter ({adapter})"
    except Exception as exc:  # saving failed too (a full disk, memory): say so, keep the first cause
        kept = f"{checkpoint.name} was saved, " if checkpoint else ""
        saved = f"{kept}saving failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    checkpoint = checkpoint or latest_good_checkpoint(output_dir)  # never advise --overwrite over good ones
    again = f"grpo train --resume latest --output-dir {output_dir}" if checkpoint else "grpo train --overwrite ..."
    return RunFailed(
        f"{kind} at step {step + 1}: {cause}; {saved}; traceback in {log}; fix the cause, then: {again}", code
    )
