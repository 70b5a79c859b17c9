"""`grpo train`: the settings, the plan, the model, the data, the trainer, training, the adapter."""

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

from grpo_cli import dist, models, report, runs, tools
from grpo_cli.adapter import MANIFEST, fingerprint, save_adapter, write_json
from grpo_cli.config import Settings, unsloth_environment
from grpo_cli.errors import GrpoError
from grpo_cli.plan import Plan, resolve


def train(settings: Settings, resume: str | bool = False, overwrite: bool = False, resume_anyway: bool = False) -> Path:
    """Run GRPO as the settings say; returns the adapter directory. Under a launcher (accelerate launch, torchrun)
    every process runs this; the main one alone prints the run and writes its files."""
    output_dir = Path(settings.train.output_dir)

    # 1. Plan: the trainer, generator and weights that this machine and launcher give these settings
    plan = resolve(settings)
    print(plan.line())
    unsloth_environment(settings.model, plan.standby)
    models.patch_fast_rl(plan)  # unsloth before the launcher sets each process's device (and torch's allocator up)
    dist.start(cpu=not plan.cuda, timeout=settings.train.extra.get("ddp_timeout", 1800))

    # 2. Input: all that can fail before a model loads, checked on every process; all stop if one fails
    reward_funcs, toolset, checkpoint = dist.agree(check_input, settings, plan, resume, overwrite, resume_anyway)

    # 3. Model: unsloth first where it trains, as it patches trl and transformers on import; the trainer's
    # settings before the weights, as DeepSpeed ZeRO-3 loads each process's shard only once they exist
    from grpo_cli.trainer import grpo_config

    config = grpo_config(settings, plan)
    model, tokenizer = models.load_model(settings.model, plan)
    plan = models.as_loaded(model, plan)
    if toolset:  # the template that renders the tools and the parser TRL reads the model's calls with
        toolset.template, toolset.rollout_template = tools.carry_tools(tokenizer, settings.model.model)
        print(toolset.template)
    manifest = run_manifest(settings, plan, model, tokenizer, toolset)
    model = models.add_lora(model, settings.model, plan)

    # 4. Data: prompts longer than max_prompt_length dropped; held-out prompts set aside when evaluating
    examples, held_out = training_data(settings, tokenizer, toolset)

    # 5. Trainer, in a run folder that is this run's alone from here on
    lock = dist.agree(runs.claim, output_dir, overwrite)
    try:
        trainer, stop = build_trainer(
            settings, plan, model, tokenizer, reward_funcs, toolset, config, examples, held_out
        )
        model = model if plan.unsloth else trainer.model  # on the plain path, the PEFT model TRL wrapped
        if dist.is_main():
            write_json(output_dir / MANIFEST, manifest)
            if checkpoint:
                report.keep_metrics_until(output_dir, int(Path(checkpoint).name.split("-")[-1]))
        if checkpoint and trainer.curriculum is not None:  # the level where the checkpoint left it
            trainer.curriculum.resume(Path(checkpoint))

        # 6. Train: Ctrl-C or SIGTERM stops after the current step; a failure keeps what the completed steps made
        started = time.time()
        fit(trainer, stop, checkpoint, model, manifest, output_dir)

        # 7. Save the adapter, with the held-out figures before training and at the last evaluation
        adapter = save(trainer, plan, model, manifest, output_dir)
    finally:
        if lock is not None:
            runs.release_lock(lock)
    print(f"Trained {trainer.state.global_step} steps in {time.time() - started:.0f}s; adapter saved to {adapter}")
    if dist.is_main():
        print(f"Metrics: {output_dir / report.METRICS}, plot: {output_dir / report.PLOT}")
    if stop.signum is not None:
        print(f"Interrupted: resume with --resume latest --output-dir {output_dir}")
        raise SystemExit(128 + stop.signum)
    return adapter


def check_input(settings: Settings, plan: Plan, resume: str | bool, overwrite: bool, resume_anyway: bool):
    """Everything about the input that can fail before a model loads; returns the rewards, the tools and the
    checkpoint."""
    from grpo_cli.data import eval_examples, fit_prompt_length, load_examples
    from rewards import checked, resolve

    if plan.generator == "server" and dist.is_main():  # TRL's main process alone talks to the server
        models.check_server(settings.model.vllm_server)
    if plan.problem:
        raise GrpoError(plan.problem)
    if settings.train.dynamic_sampling and plan.processes > 1:
        raise GrpoError(
            f"dynamic sampling keeps a group whole on one process: it runs alone, not under {plan.strategy} with "
            f"{plan.processes} processes; drop --dynamic-sampling or train in one process"
        )
    weights = [v for v in ("UNSLOTH_GRPO_ZERO_VARIANCE_EXCLUDE", "UNSLOTH_GRPO_LOSS_AGGREGATION") if os.environ.get(v)]
    if settings.train.dynamic_sampling and plan.unsloth and weights:
        raise GrpoError(
            f"{weights[0]}: Unsloth's loss weights are normalized over one generation round, and dynamic sampling "
            "merges several: unset it (dynamic sampling drops the groups without spread itself)"
        )
    output_dir = Path(settings.train.output_dir)
    runs.check_lock(output_dir)
    runs.check_output_dir(output_dir, bool(resume), overwrite)
    d = settings.data
    reward_funcs = [checked(resolve(spec)[0], d.reward_timeout, d.reward_nan) for spec in d.rewards]
    if d.tools or d.environment:  # tools are described through transformers and TRL: unsloth first, where it trains
        models.patch_fast_rl(plan)
    toolset = tools.resolve(d)
    for logger in {settings.train.report_to} - {"none"}:
        if importlib.util.find_spec(logger) is None:
            raise GrpoError(
                f"report_to {logger}: {logger} is not installed: pip install {logger}, or use --report-to none"
            )
    checkpoint = runs.resume_point(settings, resume, resume_anyway)
    models.resolve_model(settings.model.model, convert=False)
    if toolset:  # the model's tokenizer alone: its chat template must carry the tools, and the prompts their schemas
        tokenizer = tools.check_template(settings.model.model, plan)
        fit_prompt_length(settings, tokenizer, toolset.schemas())
    examples = load_examples(settings.data)
    if settings.train.eval_steps:  # the held-out prompts too
        eval_examples(settings.data, examples, settings.train.eval_limit, settings.train.seed)
    return reward_funcs, toolset, checkpoint


def run_manifest(settings: Settings, plan: Plan, model, tokenizer, toolset) -> dict:
    """What an adapter from this run needs to be used as it was trained, the weights as the plan loaded them."""
    return {
        "base_model": settings.model.model,
        "base_fingerprint": fingerprint(model.config),
        "system_prompt": settings.data.system_prompt,
        "chat_template": tokenizer.chat_template,
        "answer_extraction": "text between <answer> and </answer>; GSM8K references: text after ####",
        "rewards": settings.data.rewards,
        **({"tools": toolset.describe() | {"template": toolset.template}} if toolset else {}),
        "plan": plan.to_dict(),
        "settings": settings.to_dict(),
    }


def training_data(settings: Settings, tokenizer, toolset) -> tuple[list[dict], list[dict] | None]:
    """The training prompts and, when the run evaluates while training, the held-out ones; their length counted
    with the tools' schemas, as TRL renders them."""
    from grpo_cli.data import eval_examples, load_examples

    schemas = toolset.schemas() if toolset else None
    examples, held_out = load_examples(settings.data, tokenizer, schemas), None
    if settings.train.eval_steps:
        held_out, examples, described = eval_examples(
            settings.data, examples, settings.train.eval_limit, settings.train.seed, tokenizer, schemas
        )
        print(f"Evaluating before step 1 and every {settings.train.eval_steps} steps on {described}")
    print(f"Training on {len(examples)} prompts from {settings.data.dataset}")
    return examples, held_out


def build_trainer(
    settings: Settings, plan: Plan, model, tokenizer, reward_funcs, toolset, config, examples, held_out
):  # fmt: skip
    """TRL's trainer as the plan says, with the run's tools and environments, and grpo's callbacks: the step line,
    a clean stop, the no-signal watch and, first so that every logger sees its figures with the step's, the
    held-out evaluation."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from grpo_cli import callbacks, curriculum
    from grpo_cli.trainer import trainer_class

    t, output_dir = settings.train, Path(settings.train.output_dir)
    trainer = trainer_class(plan)(
        model=model,
        processing_class=tokenizer,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=Dataset.from_list(examples),
        peft_config=None if plan.unsloth else models.lora_config(settings.model),
        tools=toolset.tools if toolset else None,
        environment_factory=toolset.environment_factory if toolset else None,
        callbacks=[
            log := callbacks.step_log(output_dir, reward_funcs),
            stop := callbacks.stop_on_signal(),
            watch := callbacks.no_signal_watch(t.no_signal_steps, t.stop_on_no_signal),
        ],
    )
    log.trainer = watch.trainer = trainer
    trainer.dynamic_sampling_rounds = t.dynamic_sampling_rounds if t.dynamic_sampling else None
    trainer.curriculum = curriculum.for_run(settings.data)
    trainer.remove_callback(PrinterCallback)  # StepLog prints each step instead
    if held_out is not None:
        evaluator = callbacks.held_out_eval(settings, plan, held_out, tokenizer, output_dir, toolset)
        evaluator.trainer = trainer
        trainer.callback_handler.callbacks.insert(0, evaluator)
    return trainer, stop


def fit(trainer, stop, checkpoint: str | None, model, manifest: dict, output_dir: Path) -> None:
    """trainer.train, with the signals routed to the clean stop; a failure is rescued into a one-line error."""
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
        raise runs.rescue(trainer, model, manifest, output_dir, failure) from failure


def save(trainer, plan: Plan, model, manifest: dict, output_dir: Path) -> Path:
    """The adapter, its manifest and card, and the plot. Where the strategy shards the weights (FSDP, ZeRO) they
    are gathered from every process; under DDP each process says its weights' hash, equal when gradients were
    averaged."""
    sharded = plan.processes > 1 and not plan.unsloth
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if sharded else None
    if plan.processes > 1 and not sharded:
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
        report.plot(output_dir)
    return adapter
