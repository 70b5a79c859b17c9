"""The `grpo` command: parse, then delegate to a plain function."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from grpo_cli.errors import GrpoError
from rewards import REWARDS

app = typer.Typer(help="Teach a language model to reason with GRPO.", no_args_is_help=True, add_completion=False)
_state = {"debug": False}

REWARD_HELP = f"NAME[:WEIGHT], repeatable: {', '.join(REWARDS)}, or package.module:function / file.py:function"


@app.callback()
def root(debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False) -> None:
    _state["debug"] = debug


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe: any setting or GRPOConfig field.")] = None,
    model: Annotated[Optional[str], typer.Option(help="smollm2-135m (embedded), an alias, a hub id, a model directory or a .gguf file.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="arithmetic (generated), gsm8k (hub), or a .jsonl/.json/.csv/.parquet file.")] = None,
    question_field: Annotated[Optional[str], typer.Option(help="Question column of a data file.")] = None,
    answer_field: Annotated[Optional[str], typer.Option(help="Answer column of a data file.")] = None,
    system_prompt: Annotated[Optional[str], typer.Option(help="System prompt text, or @path/to/file.")] = None,
    reward: Annotated[Optional[list[str]], typer.Option(help=REWARD_HELP)] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    num_generations: Annotated[Optional[int], typer.Option(help="Completions per prompt (the group).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Completions per device batch; divisible by --num-generations.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps.")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Learning rate.")] = None,
    max_prompt_length: Annotated[Optional[int], typer.Option(help="Drop prompts longer than this many tokens.")] = None,
    max_completion_length: Annotated[Optional[int], typer.Option(help="Tokens generated per completion at most.")] = None,
    lora_rank: Annotated[Optional[int], typer.Option(help="LoRA rank.")] = None,
    lora_alpha: Annotated[Optional[int], typer.Option(help="LoRA alpha (default: the rank).")] = None,
    beta: Annotated[Optional[float], typer.Option(help="KL coefficient to the frozen reference.")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Clipping range of the ratio.")] = None,
    num_iterations: Annotated[Optional[int], typer.Option(help="Passes over each generated batch (mu).")] = None,
    loss_type: Annotated[Optional[str], typer.Option(help="grpo, dr_grpo, dapo, bnpo, ... (TRL's loss_type).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature while training.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N examples.")] = None,
    output_dir: Annotated[Optional[str], typer.Option(help="Where checkpoints, metrics and the adapter go.")] = None,
    save_steps: Annotated[Optional[int], typer.Option(help="Save a checkpoint every N steps.")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue a run: 'latest' or a checkpoint-N directory.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
) -> None:
    """Train a LoRA adapter with GRPO."""
    from grpo_cli.config import load_settings
    from grpo_cli.train import train as run

    flags = dict(
        model=model, dataset=dataset, question_field=question_field, answer_field=answer_field,
        system_prompt=system_prompt, rewards=reward or None, max_steps=max_steps,
        num_generations=num_generations, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=learning_rate,
        max_prompt_length=max_prompt_length, max_completion_length=max_completion_length,
        lora_rank=lora_rank, lora_alpha=lora_alpha, beta=beta, epsilon=epsilon,
        num_iterations=num_iterations, loss_type=loss_type, temperature=temperature, seed=seed,
        limit=limit, output_dir=output_dir, save_steps=save_steps,
    )  # fmt: skip
    settings = load_settings(str(config) if config else None, flags)
    run(settings, resume=True if resume == "latest" else (resume or False), overwrite=overwrite)


def main() -> None:
    try:
        app()
    except GrpoError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
