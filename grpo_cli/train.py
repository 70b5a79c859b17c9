"""Build and run the GRPO trainer; save the adapter with its manifest."""

import importlib.util
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from grpo_cli import dist, report, runs
from grpo_cli.adapter import MANIFEST, fingerprint, occupied, read_manifest, save_adapter, write_json
from grpo_cli.config import Settings
from grpo_cli.errors import GrpoError


def run_manifest(settings: Settings, model, tokenizer) -> dict:
    """What an adapter from this run needs to be used as it was trained."""
    return {
        "base_model": settings.model.model,
        "base_fingerprint": fingerprint(model.config),
        "system_prompt": settings.data.system_prompt,
        "chat_template": tokenizer.chat_template,
        "answer_extraction": "text between <answer> and </answer>; GSM8K references: text after ####",
        "rewards": settings.data.rewards,
        "settings": settings.to_dict(),
    }


def grpo_config(settings: Settings, cpu: bool, engine: str = "transformers"):
    """TRL's GRPOConfig from our settings; recipe names that TRL dropped are mapped here. ``engine`` as
    ``models.engine`` chose it: vLLM (Unsloth's, or TRL's colocated one) or TRL's server mode."""
    import torch
    from trl import GRPOConfig

    from rewards import split_weight

    t = settings.train
    args = dict(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        num_generations=t.num_generations,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        max_completion_length=t.max_completion_length,
        beta=t.beta,
        epsilon=t.epsilon,
        num_iterations=t.num_iterations,
        loss_type=t.loss_type,
        temperature=t.temperature,
        seed=t.seed,
        save_steps=t.save_steps,
        warmup_steps=t.warmup_ratio,  # transformers 5 reads a value below 1 as a ratio
        lr_scheduler_type=t.lr_scheduler_type,
        optim=t.optim,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        report_to=t.report_to,
        reward_weights=[split_weight(r)[1] for r in settings.data.rewards],
        disable_tqdm=True,
    )
    args.update(t.extra)
    bitsandbytes = "8bit" in args["optim"] or "paged" in args["optim"]
    if bitsandbytes and (cpu or dist.strategy() not in dist.UNSLOTH_STRATEGIES):
        why = "needs CUDA" if cpu else f"does not step {dist.strategy()}'s sharded weights"
        print(f"{'CPU' if cpu else dist.strategy()}: optimizer {args['optim']} {why}, using adamw_torch")
        args["optim"] = "adamw_torch"
    if cpu:
        args.update(use_cpu=True, bf16=False, fp16=False)
        args.setdefault("gradient_checkpointing", False)  # recomputing the forward costs time; memory is ample
    else:
        bf16 = torch.cuda.is_bf16_supported()
        args.setdefault("bf16", bf16)
        args.setdefault("fp16", not bf16)
    if engine in ("vllm", "trl-vllm"):
        args["use_vllm"] = True
    if engine == "trl-vllm":  # TRL's own colocated engine: the run's share of the GPU and context, not TRL's defaults
        m, d = settings.model, settings.data
        args.update(
            vllm_gpu_memory_utilization=m.gpu_memory_utilization,
            vllm_max_model_length=d.max_prompt_length + t.max_completion_length,
        )
    if engine == "server":
        args.update(use_vllm=True, vllm_mode="server", vllm_server_base_url=settings.model.vllm_server)
    if dist.world_size() > 1:  # every LoRA weight takes part in each step: no search for unused ones
        args.setdefault("ddp_find_unused_parameters", False)
    try:
        return GRPOConfig(**args)
    except ValueError as exc:  # TRL's own checks (batch sizes against num_generations and the like)
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GrpoError(
            f"the trainer settings do not fit together ({cause}): change them in the recipe or flags"
        ) from exc


def trainer_class(cpu: bool):
    """TRL's GRPOTrainer (Unsloth's, once unsloth has patched it on a GPU), with a check that the loss is finite;
    otherwise used as it is on a GPU. On CPU its
    transformers generation runs with the LoRA folded into the weights and faster sampling, and its log-prob
    forward computes each prompt once for its group."""
    import torch
    from trl import GRPOTrainer

    from grpo_cli.generate import cpu_generation, prompts_prefilled_once, shared_prompt_logps

    class Trainer(GRPOTrainer):
        def compute_loss(self, *args, **kwargs):
            out = super().compute_loss(*args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            # before backward, so the weights stay those of the last step; on every process at once under a launcher
            if dist.any_process(not torch.isfinite(loss.detach()).all()):
                raise runs.NumericError(
                    f"the loss is {loss.detach().float().mean().item()}: lower --learning-rate or max_grad_norm, "
                    "or look for rewards of extreme size"
                )
            return out

    if not cpu:
        return Trainer

    class CPUTrainer(Trainer):
        def _generate_single_turn(self, prompts, *args, **kwargs):
            with cpu_generation(self.model, len(prompts)), prompts_prefilled_once(self.model):
                return super()._generate_single_turn(prompts, *args, **kwargs)

        def _get_per_token_logps_and_entropies(
            self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
            compute_aux_loss=False, **multimodal,
        ):  # fmt: skip
            plain = (
                self.args.gradient_checkpointing  # no cache under gradient checkpointing
                or compute_aux_loss
                or any(v is not None for v in multimodal.values())
                or (batch_size or len(input_ids)) < len(input_ids)
            )
            with self.accelerator.autocast():
                shared = None if plain else shared_prompt_logps(
                    model, input_ids, attention_mask, logits_to_keep, compute_entropy
                )  # fmt: skip
            if shared is None:
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                    **multimodal,
                )  # fmt: skip
            return *shared, None

    return CPUTrainer


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
            line = [f"step {step}/{state.max_steps}", f"reward {logs['reward']:.3f}", *per_reward, kl, length, nan,
                    seconds, held_out]  # fmt: skip
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
    checkpoint = (runs.latest_good_checkpoint(output_dir) if resume is True else resume) or None
    if resume and (checkpoint is None or not Path(checkpoint).is_dir()):
        raise GrpoError(
            f"--resume: no checkpoint {checkpoint or 'checkpoint-N'} in {output_dir}: start a new run with --overwrite"
        )
    if checkpoint and resume is not True and (why := runs.broken(Path(checkpoint))):
        raise GrpoError(f"--resume: {checkpoint} is not whole ({why}): use --resume latest or another checkpoint")
    saved = read_manifest(output_dir).get("settings") if checkpoint else None
    changes = runs.changed_meaning(saved, settings.to_dict()) if saved else []
    if changes and not resume_anyway:
        raise GrpoError(
            f"--resume would change what {output_dir} trains ({'; '.join(changes)}): "
            "drop those settings, start a new --output-dir, or pass --resume-anyway"
        )
    return checkpoint


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
            self.flat = self.flat + 1 if logs["frac_reward_zero_std"] >= 1.0 else 0
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


def held_out_eval(settings: Settings, examples: list[dict], tokenizer, output_dir: Path, engine: str):
    """A callback that scores the adapter being trained on held-out prompts, greedy, with the run's system prompt,
    in the engine training generates with: before step 1, then every ``eval_steps`` steps. Its accuracy, format
    rate, mean length and cost go into that step's log (metrics, step line, loggers, plot)."""
    from rich.console import Console
    from transformers import TrainerCallback

    from grpo_cli.evaluate import score, summarize
    from grpo_cli.generate import ENGINES, Sampling

    texts = [tokenizer.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=False) for e in examples]
    greedy = Sampling(greedy=True, max_tokens=settings.train.max_completion_length)
    every = settings.train.eval_steps

    class HeldOut(TrainerCallback):
        trainer = None
        pending = None

        def evaluate(self) -> dict:
            started = time.time()
            model = self.trainer.model
            generator = ENGINES[engine](model, tokenizer, None)
            generator.follow()
            model.eval()
            try:
                completions = generator.generate(texts, greedy, adapter=True)
            finally:
                model.train()  # TRL logs a step's metrics as training ones only while the model is in training mode
            summary = summarize(score(completions, examples, [], tokenizer), [])
            return {f"eval_{k}": v for k, v in summary.items()} | {"eval_seconds": time.time() - started}

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step == 0 and state.is_world_process_zero:  # the others wait for it at the next step
                metrics = self.evaluate()
                report.append_metrics(output_dir, {"step": 0, **metrics})
                Console(highlight=False).print(f"step 0/{state.max_steps} | {eval_line(metrics)}")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0 and state.is_world_process_zero:
                self.pending = self.evaluate()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.pending and logs is not None and "reward" in logs:
                logs.update(self.pending)  # the loggers after this callback, and StepLog, see it with the step
                self.pending = None

    return HeldOut()


def eval_line(logs: dict) -> str:
    return (
        f"eval accuracy {logs['eval_accuracy']:.1%} format {logs['eval_format_rate']:.1%} "
        f"length {logs['eval_mean_length']:.1f} ({logs['eval_seconds']:.0f}s)"
    )


def train(settings: Settings, resume: str | bool = False, overwrite: bool = False, resume_anyway: bool = False) -> Path:
    """Run GRPO as the settings say; returns the adapter directory. Under a launcher (accelerate launch, torchrun)
    every process runs this; the main one alone prints the run and writes its files."""
    from grpo_cli import models

    output_dir = Path(settings.train.output_dir)
    dist.start(cpu=not models.cuda_available(), timeout=settings.train.extra.get("ddp_timeout", 1800))

    # Check the input before anything is loaded or written: on every process, which all stop if one fails
    reward_funcs, checkpoint = dist.agree(check_input, settings, resume, overwrite, resume_anyway)

    # Load model: unsloth first, as it patches trl and transformers on import; the trainer's settings before the
    # weights, as DeepSpeed ZeRO-3 loads each process's shard only once they exist
    engine = models.engine(settings.model)
    print(f"Backend: {models.generation_backend(settings.model)}")
    if dist.world_size() > 1:
        print(f"Launcher: {dist.describe()}")
    if engine == "transformers" and models.cuda_available():
        print("vLLM is not installed: generating with transformers (pip install 'grpo-cli[gpu]' for vLLM)")
    models.patch_fast_rl()
    config = grpo_config(settings, cpu=not models.cuda_available(), engine=engine)
    model, tokenizer = models.load_model(settings.model)
    manifest = run_manifest(settings, model, tokenizer)
    model = models.add_lora(model, settings.model)

    # Data, with prompts longer than max_prompt_length dropped
    from datasets import Dataset

    from grpo_cli.data import load_examples

    examples = load_examples(settings.data, tokenizer)
    if settings.train.eval_steps:
        from grpo_cli.data import eval_examples

        held_out, examples, described = eval_examples(
            settings.data, examples, settings.train.eval_limit, settings.train.seed, tokenizer
        )
        print(f"Evaluating before step 1 and every {settings.train.eval_steps} steps on {described}")
    print(f"Training on {len(examples)} prompts from {settings.data.dataset}")

    lock = dist.agree(claim, output_dir, overwrite)  # from here on the folder is this run's alone
    try:
        # Build trainer
        from transformers import PrinterCallback

        t = settings.train
        # the CPU generation and log-prob speed-ups fold and pack whole weights: not with FSDP's or ZeRO's shards
        trainer = trainer_class(cpu=not models.cuda_available() and models.unsloth_trains())(
            model=model,
            processing_class=tokenizer,
            reward_funcs=reward_funcs,
            args=config,
            train_dataset=Dataset.from_list(examples),
            callbacks=[
                log := step_log(output_dir, reward_funcs),
                stop := stop_on_signal(),
                watch := no_signal_watch(t.no_signal_steps, t.stop_on_no_signal),
            ],
        )
        log.trainer = watch.trainer = trainer
        trainer.remove_callback(PrinterCallback)  # StepLog prints each step instead
        if settings.train.eval_steps:  # first, so that every logger sees the held-out figures with the step's
            evaluator = held_out_eval(settings, held_out, tokenizer, output_dir, engine)
            evaluator.trainer = trainer
            trainer.callback_handler.callbacks.insert(0, evaluator)
        if dist.is_main():
            write_json(output_dir / MANIFEST, manifest)
            if checkpoint:
                report.keep_metrics_until(output_dir, int(Path(checkpoint).name.split("-")[-1]))

        # Train; Ctrl-C or SIGTERM stops after the current step; any failure keeps what the completed steps made
        started = time.time()
        previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        failure = None
        try:
            trainer.train(resume_from_checkpoint=checkpoint)
        except Exception as exc:
            failure = exc
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if failure is not None:
            raise rescue(trainer, model, manifest, output_dir, failure) from failure

        # Save adapter, with the held-out figures before training and at the last evaluation
        sharded = dist.world_size() > 1 and not models.unsloth_trains()  # FSDP, DeepSpeed: gather the weights
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
        if dist.world_size() > 1 and not sharded:  # the same weights on every process, or no gradients averaged
            print(f"{dist.process_name()}: adapter weights {dist.digest(model)} at step {trainer.state.global_step}",
                  file=sys.stderr, flush=True)  # fmt: skip
        adapter = output_dir / "adapter"
        if dist.is_main():
            history = [h for h in trainer.state.log_history if "reward" in h]
            manifest.update(step=trainer.state.global_step, last_reward=history[-1]["reward"] if history else None)
            evals = [r for r in report.read_metrics(output_dir) if "eval_accuracy" in r]
            if len(evals) > 1 and evals[0]["step"] == 0:
                manifest["eval"] = {
                    key: {"base": evals[0][f"eval_{key}"], "adapter": evals[-1][f"eval_{key}"]}
                    for key in ("accuracy", "format_rate", "mean_length")
                }
            adapter = save_adapter(model, adapter, manifest, force=True, state_dict=state_dict)
            plot = report.plot(output_dir)
    finally:
        if lock is not None:
            runs.release_lock(lock)
    print(f"Trained {trainer.state.global_step} steps in {time.time() - started:.0f}s; adapter saved to {adapter}")
    if dist.is_main():
        print(f"Metrics: {output_dir / report.METRICS}, plot: {plot}")
    if stop.signum is not None:
        print(f"Interrupted: resume with --resume latest --output-dir {output_dir}")
        raise SystemExit(128 + stop.signum)
    return adapter


def check_input(settings: Settings, resume: str | bool, overwrite: bool, resume_anyway: bool):
    """Everything about the input that can fail before a model loads; returns the rewards and the checkpoint."""
    from grpo_cli import models
    from grpo_cli.data import load_examples
    from rewards import checked, resolve

    output_dir = Path(settings.train.output_dir)
    runs.check_lock(output_dir)
    check_output_dir(output_dir, bool(resume), overwrite)
    d = settings.data
    reward_funcs = [checked(resolve(spec)[0], d.reward_timeout, d.reward_nan) for spec in d.rewards]
    for logger in {settings.train.report_to} - {"none"}:
        if importlib.util.find_spec(logger) is None:
            raise GrpoError(
                f"report_to {logger}: {logger} is not installed: pip install {logger}, or use --report-to none"
            )
    checkpoint = resume_point(settings, resume, resume_anyway)
    models.resolve_model(settings.model.model, convert=False)
    load_examples(settings.data)
    if settings.model.vllm_server and dist.is_main():  # TRL's main process alone talks to the server
        models.check_server(settings.model.vllm_server)
    if settings.model.vllm_server and not (models.cuda_available() and importlib.util.find_spec("vllm")):
        raise GrpoError(
            "--vllm-server: TRL sends the server the weights over NCCL, from a CUDA machine with vLLM installed: "
            "train on one (pip install 'grpo-cli[gpu]'), or drop --vllm-server"
        )
    if settings.train.eval_steps and not models.unsloth_trains():
        raise GrpoError(
            f"--eval-steps: evaluation during training runs alone or under DDP, not under {dist.strategy()}: "
            "drop --eval-steps and score the adapter afterwards with grpo eval"
        )
    return reward_funcs, checkpoint


def claim(output_dir: Path, overwrite: bool) -> Path | None:
    """The main process takes the run's lock and, with --overwrite, removes the old run only now that the new one
    has loaded; the others wait for it, so none writes into the folder before that."""
    lock = None
    if dist.is_main():
        lock = runs.acquire_lock(output_dir)
        if overwrite:
            for path in output_dir.iterdir():
                if path.name != runs.LOCK:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return lock  # dist.agree, which calls this, holds the others until it is done


def rescue(trainer, model, manifest: dict, output_dir: Path, failure: Exception) -> runs.RunFailed:
    """After a failure mid-step: the last completed step as a checkpoint and the adapter, the plot, the traceback
    in error.log; returns the one-line error to raise, with its exit code."""
    kind, code = runs.failure_kind(failure)
    cause = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
    if not dist.is_main():
        return runs.RunFailed(f"{dist.process_name()}: {kind} at step {trainer.state.global_step + 1}: {cause}", code)
    log = runs.write_error_log(output_dir, failure)
    if dist.world_size() > 1:  # saving takes every process, and the others may have stopped or be waiting elsewhere
        last = runs.latest_good_checkpoint(output_dir)
        again = f"grpo train --resume latest --output-dir {output_dir}" if last else "grpo train --overwrite ..."
        kept = f"{Path(last).name} is the last checkpoint" if last else "no checkpoint was saved yet"
        return runs.RunFailed(
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
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    step = trainer.state.global_step
    checkpoint = None
    try:
        checkpoint = runs.save_checkpoint(trainer, output_dir)
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
    checkpoint = checkpoint or runs.latest_good_checkpoint(output_dir)  # never advise --overwrite over good ones
    again = f"grpo train --resume latest --output-dir {output_dir}" if checkpoint else "grpo train --overwrite ..."
    return runs.RunFailed(
        f"{kind} at step {step + 1}: {cause}; {saved}; traceback in {log}; fix the cause, then: {again}", code
    )


def reward_check(settings: Settings, prompts: int = 8) -> tuple[list[dict], float, int, int]:
    """Sample the base model as training would; per reward: mean, std, share of groups with no spread.
    Also returns the share of completions without an <answer> tag, the prompt count and the group size."""
    import statistics

    from grpo_cli.data import load_examples
    from grpo_cli.generate import Pair, Sampling
    from rewards import checked, resolve

    d = settings.data
    funcs = {spec: checked(resolve(spec)[0], d.reward_timeout, d.reward_nan) for spec in d.rewards}
    examples = load_examples(settings.data)[:prompts]
    pair = Pair(settings.model.model, None, settings.model.max_seq_length)
    g = settings.train.num_generations
    texts = pair.texts([e["prompt"][-1]["content"] for e in examples for _ in range(g)], settings.data.system_prompt)
    sampling = Sampling(
        temperature=settings.train.temperature,
        top_p=1.0,
        max_tokens=settings.train.max_completion_length,
        seed=settings.train.seed,
    )
    completions = [[{"role": "assistant", "content": c}] for c in pair.base(texts, sampling)]
    repeated = [e for e in examples for _ in range(g)]
    rows = []
    for spec, func in funcs.items():
        values = func(
            prompts=[e["prompt"] for e in repeated], completions=completions, answer=[e["answer"] for e in repeated]
        )
        groups = [values[i : i + g] for i in range(0, len(values), g)]
        rows.append({
            "reward": spec,
            "mean": statistics.mean(values),
            "std": statistics.pstdev(values),
            "zero_spread_groups": sum(len(set(group)) == 1 for group in groups) / len(groups),
        })  # fmt: skip
    unparsed = sum("<answer>" not in c[0]["content"] for c in completions) / len(completions)
    return rows, unparsed, len(examples), g
