"""What the trainer calls back at each step: the step line and metrics, a clean stop on a signal, a warning when
the rewards give no signal, and held-out evaluation while training."""

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from grpo_cli import dist, report
from grpo_cli.config import Settings
from grpo_cli.plan import Plan


def step_log(output_dir: Path, reward_funcs: list = (), sample_every: int = 10):
    """A callback that shows a progress bar, prints one line a step, appends metrics and keeps samples."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import TrainerCallback

    console = Console(soft_wrap=True, highlight=False)

    class StepLog(TrainerCallback):
        trainer = None  # set once the trainer exists: TRL keeps the latest completions on it
        progress = task = None
        skipped = 0

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:  # under a launcher the main process alone shows and writes the run
                return
            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=console, transient=True,
            )  # fmt: skip
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, status="")
            self.progress.start()

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.stop()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs or not state.is_world_process_zero:
                return
            step = state.global_step
            report.append_metrics(
                output_dir, {"step": step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            )
            if self.trainer is not None and (step == 1 or step % sample_every == 0):
                report.append_samples(output_dir, step, getattr(self.trainer, "_logs", {}))
            per_reward = [
                f"{k.split('/')[1].removesuffix('_reward')} {v:.3f}"
                for k, v in logs.items()
                if k.startswith("rewards/") and k.endswith("/mean")
            ]
            kl = f"kl {logs['kl']:.4f}" if "kl" in logs else None
            length = f"length {logs.get('completions/mean_length', 0):.1f}"
            seconds = f"{logs['step_time']:.1f}s" if "step_time" in logs else None
            skipped = sum(getattr(f, "skipped", 0) for f in reward_funcs)  # reward_nan: skip
            nan = f"nan skipped {skipped - self.skipped}" if skipped > self.skipped else None
            self.skipped = skipped
            held_out = eval_line(logs) if "eval_accuracy" in logs else None
            line = [f"step {step}/{state.max_steps}", f"reward {logs['reward']:.3f}", *per_reward, kl, length,
                    tool_part(logs, "tools/call_frequency", "tools/failure_frequency"), sampling_part(logs),
                    f"level {logs['curriculum/level']:g}" if "curriculum/level" in logs else None, nan, seconds,
                    held_out]  # fmt: skip
            console.print(" | ".join(part for part in line if part))
            accuracy = f"eval acc {logs['eval_accuracy']:.1%}" if "eval_accuracy" in logs else None
            status = " | ".join(part for part in (f"reward {logs['reward']:.3f}", kl, length, accuracy) if part)
            self.progress.update(self.task, completed=step, status=status)

    return StepLog()


def stop_on_signal():
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. A second one exits at once. Under a launcher every
    process stops after the same step, whichever got the signal; a launcher may pass on a Ctrl-C that the terminal
    also sent its workers, so a repeat within a few seconds is the same one."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        signum = None
        at = 0.0

        def handle(self, signum, frame):
            if self.signum is not None:
                if dist.world_size() == 1 or time.monotonic() - self.at > 3:
                    os._exit(128 + signum)
                return
            self.signum, self.at = signum, time.monotonic()
            if dist.is_main():
                print(
                    "\nStopping after this step to save a checkpoint and the adapter (again to quit at once)",
                    flush=True,
                )

        def on_step_end(self, args, state, control, **kwargs):
            if dist.any_process(self.signum is not None):
                self.signum = self.signum or signal.SIGTERM  # another process got it
                control.should_save = True
                control.should_training_stop = True

    return StopOnSignal()


def no_signal_watch(steps: int, stop: bool):
    """Warn once (or stop, with a checkpoint) when no group has had any reward spread for ``steps`` steps in a
    row: every advantage is zero then, and GRPO learns nothing."""
    from rich.console import Console
    from transformers import TrainerCallback

    class NoSignal(TrainerCallback):
        flat = 0
        warned = False
        trainer = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "frac_reward_zero_std" not in logs:
                return
            # with dynamic sampling, what counts is the batch trained on: flat only when no round found any spread
            trained = logs.get("dynamic_sampling/flat_groups_trained")
            if trained is None:
                flat = logs["frac_reward_zero_std"] >= 1.0
            else:
                flat = trained >= args.generation_batch_size // args.num_generations
            self.flat = self.flat + 1 if flat else 0
            if self.flat < steps or self.warned:
                return
            completions = list(getattr(self.trainer, "_logs", {}).get("completion", []))
            texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            unparsed = sum("<answer>" not in t for t in texts) / len(texts) if texts else float("nan")
            Console(highlight=False).print(
                f"[yellow]warning[/]: no learning signal for {self.flat} steps: every reward is constant within "
                f"every group ({unparsed:.0%} of the last completions have no <answer> tag). Add a shaped reward "
                "(e.g. --reward answer_tag), a one-shot example in --system-prompt, or more --num-generations; "
                "`grpo train --dry-run` checks the rewards on base-model samples"
                + (". Stopping with a checkpoint (--stop-on-no-signal)" if stop else "")
            )
            self.warned = True
            if stop:
                control.should_save = control.should_training_stop = True

    return NoSignal()


def held_out_eval(settings: Settings, plan: Plan, examples: list[dict], tokenizer, output_dir: Path, toolset=None):
    """A callback that scores the adapter being trained on held-out prompts, greedy, with the run's system prompt,
    in the engine training generates with and, with tools, through the same tool loop: before step 1, then every
    ``eval_steps`` steps. Its accuracy, format rate, mean length, tool use and cost go into that step's log
    (metrics, step line, loggers, plot). A curriculum that follows the held-out accuracy (``follow: held_out``)
    reads it on the same items generated again at its current level (``eval_level_accuracy``, scored in the same
    pass), while ``eval_accuracy`` stays on the items as loaded, so that the curve compares across levels; every
    process's curriculum reads the main process's figure."""
    from rich.console import Console
    from transformers import TrainerCallback

    from grpo_cli.evaluate import score, summarize
    from grpo_cli.generate import Sampling, converse, engine_for

    greedy = Sampling(greedy=True, max_tokens=settings.train.max_completion_length)
    every = settings.train.eval_steps

    class HeldOut(TrainerCallback):
        trainer = None
        pending = None
        scratch = None  # where Unsloth's vLLM engine writes the live adapter's config: never the working directory

        def following(self):
            """The run's curriculum where it follows the held-out accuracy, else None."""
            curriculum = getattr(self.trainer, "curriculum", None)
            return curriculum if curriculum is not None and curriculum.follows == "held_out" else None

        def evaluate(self) -> dict:
            started = time.time()
            model = self.trainer.model
            curriculum = self.following()
            # the items at the curriculum's level, where it has moved from the start: scored in the same pass
            at_level = (
                curriculum.stage(examples, held_out=True) if curriculum and curriculum.level != curriculum.start else []
            )
            rows = examples + at_level
            self.scratch = self.scratch or Path(tempfile.mkdtemp(prefix="grpo-live-"))
            generator = engine_for(plan)(model, tokenizer, None, plan)
            generator.follow(self.scratch)
            model.eval()
            try:
                completions = converse(
                    lambda texts, sampling: generator.generate(texts, sampling, adapter=True),
                    tokenizer, [e["prompt"] for e in rows], greedy, toolset, rows,
                )  # fmt: skip
            finally:
                generator.rest()
                # back to training as it was: Unsloth's generate turns gradient checkpointing off for inference and
                # only its for_training turns it on again; TRL logs a step's metrics as training ones only while
                # the model is in training mode
                model.for_training() if plan.unsloth else model.train()
            tools = toolset is not None
            summary = summarize(score(completions[: len(examples)], examples, [], tokenizer), tools)
            metrics = {f"eval_{k}": v for k, v in summary.items()}
            if curriculum is not None:
                level = (
                    summarize(score(completions[len(examples) :], at_level, [], tokenizer), tools)
                    if at_level
                    else summary
                )
                metrics |= {"eval_level": float(curriculum.level), "eval_level_accuracy": level["accuracy"]}
            return metrics | {"eval_seconds": time.time() - started}

        def follow(self, metrics: dict | None) -> None:
            """On every process: the curriculum reads the main process's held-out accuracy at its level."""
            curriculum = self.following()
            if curriculum is None:
                return
            reading = dist.from_main(metrics and (int(metrics["eval_level"]), metrics["eval_level_accuracy"]))
            moved = curriculum.held_out(reading[1], reading[0])
            if moved and dist.is_main():
                print(moved, flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self.scratch is not None:
                shutil.rmtree(self.scratch, ignore_errors=True)

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step != 0:
                return
            metrics = None
            if state.is_world_process_zero:  # the others wait for it at the next step
                metrics = self.evaluate()
                report.append_metrics(output_dir, {"step": 0, **metrics})
                Console(highlight=False).print(f"step 0/{state.max_steps} | {eval_line(metrics)}")
            self.follow(metrics)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                if state.is_world_process_zero:
                    self.pending = self.evaluate()
                self.follow(self.pending)  # before the step's checkpoint, which saves the level

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.pending and logs is not None and "reward" in logs:
                logs.update(self.pending)  # the loggers after this callback, and StepLog, see it with the step
                self.pending = None

    return HeldOut()


def tool_part(logs: dict, calls: str, failures: str) -> str | None:
    """Tool calls per completion and the share that failed, where the run has tools (TRL logs both).

    >>> tool_part({"tools/call_frequency": 1.25, "tools/failure_frequency": 0.1}, "tools/call_frequency",
    ...           "tools/failure_frequency")
    'tools 1.25/completion, 10% failed'
    """
    if calls not in logs:
        return None
    return f"tools {logs[calls]:.2f}/completion, {logs.get(failures, 0.0):.0%} failed"


def sampling_part(logs: dict) -> str | None:
    """What dynamic sampling did in the step: groups without spread dropped, extra generation, and at its limit the
    groups without spread the batch was filled with.

    >>> sampling_part({"dynamic_sampling/dropped_groups": 3, "dynamic_sampling/extra_rounds": 2,
    ...                "dynamic_sampling/extra_completions": 24, "dynamic_sampling/flat_groups_trained": 1})
    'dropped 3 flat groups, +2 rounds (24 completions), limit reached: 1 flat group trained'
    >>> sampling_part({"dynamic_sampling/dropped_groups": 0, "dynamic_sampling/extra_rounds": 0,
    ...                "dynamic_sampling/extra_completions": 0, "dynamic_sampling/flat_groups_trained": 0})
    'every group has spread'
    """
    if "dynamic_sampling/extra_rounds" not in logs:
        return None
    dropped, rounds = logs["dynamic_sampling/dropped_groups"], logs["dynamic_sampling/extra_rounds"]
    filled = logs["dynamic_sampling/flat_groups_trained"]
    if not dropped and not rounds and not filled:
        return "every group has spread"
    plural = lambda n, word: f"{n:g} {word}{'' if n == 1 else 's'}"  # noqa: E731
    parts = [f"dropped {plural(dropped, 'flat group')}"]
    if rounds:
        parts.append(f"+{plural(rounds, 'round')} ({logs['dynamic_sampling/extra_completions']:g} completions)")
    if filled:
        parts.append(f"limit reached: {plural(filled, 'flat group')} trained")
    return ", ".join(parts)


def eval_line(logs: dict) -> str:
    tools = tool_part(logs, "eval_tool_calls_per_completion", "eval_tool_failure_rate")
    level = f" (level {logs['eval_level']:g}: {logs['eval_level_accuracy']:.1%})" if "eval_level" in logs else ""
    return (
        f"eval accuracy {logs['eval_accuracy']:.1%}{level} format {logs['eval_format_rate']:.1%} "
        f"length {logs['eval_mean_length']:.1f}{f' {tools}' if tools else ''} ({logs['eval_seconds']:.0f}s)"
    )
