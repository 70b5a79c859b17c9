"""The `grpo` command: parse, then delegate to a plain function."""

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from grpo_cli.errors import GrpoError
from rewards import REWARDS

app = typer.Typer(help="Teach a language model to reason with GRPO.", no_args_is_help=True, add_completion=False)
_state = {"debug": False}

REWARD_HELP = f"NAME[:WEIGHT], repeatable: {', '.join(REWARDS)}, or package.module:function / file.py:function"
TOOL_HELP = (
    "A tool the model may call, repeatable: calculator, python (sandboxed), file.py:function or module:function."
)
ENVIRONMENT_HELP = (
    "A class whose instance each rollout gets: reset(**row), its public methods as tools (file.py:Class)."
)


@app.callback()
def root(debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False) -> None:
    from grpo_cli import dist

    _state["debug"] = debug
    if not dist.is_main():  # under a launcher the main process prints; the others speak of themselves on stderr
        sys.stdout = open(os.devnull, "w")  # for the life of the process


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML recipe: any setting or GRPOConfig field.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="smollm2-135m (embedded), an alias, a hub id, a model directory or a .gguf file."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="arithmetic (generated), reasoning-gym:TASK, gsm8k, a hub id, a dataset folder, or data files (a glob works)."
        ),
    ] = None,
    dataset_config: Annotated[str | None, typer.Option(help="A hub data set's configuration.")] = None,
    split: Annotated[str | None, typer.Option(help="The split to train on (train).")] = None,
    question_field: Annotated[str | None, typer.Option(help="Question column of a data file.")] = None,
    answer_field: Annotated[str | None, typer.Option(help="Answer column of a data file.")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System prompt text, or @path/to/file.")] = None,
    reward: Annotated[list[str] | None, typer.Option(help=REWARD_HELP)] = None,
    tool: Annotated[list[str] | None, typer.Option(help=TOOL_HELP)] = None,
    environment: Annotated[str | None, typer.Option(help=ENVIRONMENT_HELP)] = None,
    max_tool_calling_iterations: Annotated[
        int | None, typer.Option(help="Tool rounds a completion may take (3).")
    ] = None,
    tool_timeout: Annotated[
        float | None, typer.Option(help="Seconds a tool call may take before it is stopped (10).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    num_generations: Annotated[int | None, typer.Option(help="Completions per prompt (the group).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Completions per device batch; divisible by --num-generations.")
    ] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Gradient accumulation steps.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    max_prompt_length: Annotated[int | None, typer.Option(help="Drop prompts longer than this many tokens.")] = None,
    max_completion_length: Annotated[int | None, typer.Option(help="Tokens generated per completion at most.")] = None,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    gpu_memory_utilization: Annotated[float | None, typer.Option(help="Share of GPU memory for vLLM (0.6).")] = None,
    vllm_server: Annotated[
        str | None, typer.Option(help="Generate on this vLLM server (http://HOST:PORT, from `grpo serve`).")
    ] = None,
    standby: Annotated[
        bool | None, typer.Option("--standby", help="Unsloth's vLLM standby mode: share GPU memory with training.")
    ] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha (default: the rank).")] = None,
    beta: Annotated[float | None, typer.Option(help="KL coefficient to the frozen reference.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Clipping range of the ratio.")] = None,
    num_iterations: Annotated[int | None, typer.Option(help="Passes over each generated batch (mu).")] = None,
    loss_type: Annotated[str | None, typer.Option(help="grpo, dr_grpo, dapo, bnpo, ... (TRL's loss_type).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature while training.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N examples.")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Where checkpoints, metrics and the adapter go.")] = None,
    report_to: Annotated[str | None, typer.Option(help="Logger: tensorboard, wandb, trackio or none.")] = None,
    eval_steps: Annotated[
        int | None, typer.Option(help="Score the adapter on held-out prompts before step 1 and every N steps.")
    ] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Held-out prompts an evaluation scores (100).")] = None,
    eval_dataset: Annotated[str | None, typer.Option(help="Data set to evaluate on (default: this one).")] = None,
    eval_split: Annotated[
        str | None, typer.Option(help="Its split (default: test if it has one, else a slice held out).")
    ] = None,
    save_steps: Annotated[int | None, typer.Option(help="Save a checkpoint every N steps.")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue a run: 'latest' or a checkpoint-N directory.")] = None,
    resume_anyway: Annotated[
        bool, typer.Option(help="Resume even with another model, data set, rewards or group size.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    stop_on_no_signal: Annotated[
        bool | None,
        typer.Option("--stop-on-no-signal", help="Stop, with a checkpoint, when rewards give no signal for a while."),
    ] = None,
    dynamic_sampling: Annotated[
        bool | None,
        typer.Option(
            "--dynamic-sampling", help="Drop groups whose rewards do not vary; generate more until the batch is full."
        ),
    ] = None,
    dynamic_sampling_rounds: Annotated[
        int | None, typer.Option(help="Extra generation rounds a step may take to fill its batch (2).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Check the rewards on base-model samples of 8 prompts; train nothing.")
    ] = False,
) -> None:
    """Train a LoRA adapter with GRPO. Under `accelerate launch` or `torchrun`, on every process they start."""
    from grpo_cli.adapter import read_manifest
    from grpo_cli.config import TrainSettings, load_settings, read_recipe
    from grpo_cli.train import train as run

    flags = dict(
        model=model, dataset=dataset, dataset_config=dataset_config, split=split, question_field=question_field,
        answer_field=answer_field,
        system_prompt=system_prompt, rewards=reward or None, max_steps=max_steps,
        tools=tool or None, environment=environment, max_tool_calling_iterations=max_tool_calling_iterations,
        tool_timeout=tool_timeout,
        num_generations=num_generations, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=learning_rate,
        max_prompt_length=max_prompt_length, max_completion_length=max_completion_length,
        lora_rank=lora_rank, lora_alpha=lora_alpha, gpu_memory_utilization=gpu_memory_utilization, vllm_standby=standby, vllm_server=vllm_server, beta=beta, epsilon=epsilon,
        num_iterations=num_iterations, loss_type=loss_type, temperature=temperature, seed=seed,
        limit=limit, output_dir=output_dir, save_steps=save_steps, stop_on_no_signal=stop_on_no_signal,
        report_to=report_to, eval_steps=eval_steps, eval_limit=eval_limit, eval_dataset=eval_dataset,
        eval_split=eval_split, dynamic_sampling=dynamic_sampling, dynamic_sampling_rounds=dynamic_sampling_rounds,
    )  # fmt: skip
    recipe = str(config) if config else None
    try:
        if resume:  # continue with the run's own settings; flags given now still win
            where = (
                output_dir or (read_recipe(recipe).get("output_dir") if recipe else None) or TrainSettings.output_dir
            )
            saved = read_manifest(Path(where)).get("settings")
            if not saved:
                raise GrpoError(f"--resume: {where} holds no grpo.json from an earlier run: check --output-dir")
            settings = load_settings(recipe, flags, saved=saved)
        else:
            settings = load_settings(recipe, flags)
    except GrpoError as exc:  # the same flags and files on every process of a launch: the same error
        exc.everywhere = True
        raise
    if dry_run:
        return check_rewards(settings)
    resume = True if resume == "latest" else (resume or False)
    run(settings, resume=resume, overwrite=overwrite, resume_anyway=resume_anyway)


def check_rewards(settings) -> None:
    from rich.console import Console
    from rich.table import Table

    from grpo_cli.evaluate import reward_check
    from grpo_cli.plan import resolve

    print(resolve(settings).line())
    rows, unparsed, prompts, g, code, tools = reward_check(settings)
    table = Table(title=f"Rewards on {prompts} prompts x {g} base-model completions")
    for column in ("reward", "mean", "std", "groups with no spread"):
        table.add_column(column, justify="left" if column == "reward" else "right")
    for row in rows:
        table.add_row(row["reward"], f"{row['mean']:.3f}", f"{row['std']:.3f}", f"{row['zero_spread_groups']:.0%}")
    console = Console()
    console.print(table)
    if code:
        console.print(
            f"completions without a ```python block: {code['no_code_block']} of {code['completions']}; "
            f"programs past the sandbox's time limit: {code['timed_out']}"
        )
    else:
        console.print(f"completions without an <answer> tag (parse failures): {unparsed:.0%}")
    if tools:
        console.print(
            f"tool calls per completion {tools['tool_calls_per_completion']:.2f}; completions that called a tool "
            f"{tools['tool_use_rate']:.0%}; calls that failed {tools['tool_failure_rate']:.0%}"
        )
    if all(row["zero_spread_groups"] == 1 for row in rows):
        console.print(
            "[yellow]warning[/]: every reward is constant within every group: GRPO has no signal to learn from. "
            "Add a shaped reward (e.g. --reward answer_tag), a one-shot example in --system-prompt, or more --num-generations",
            highlight=False,
        )


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="The base model the run trains (default: the recipe's).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="The run's YAML recipe.")] = None,
    max_prompt_length: Annotated[int | None, typer.Option(help="The run's prompt length, for the context.")] = None,
    max_completion_length: Annotated[int | None, typer.Option(help="The run's completion length.")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Share of each GPU for vLLM.")] = 0.9,
    tensor_parallel_size: Annotated[int, typer.Option(help="GPUs the server splits the model over.")] = 1,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    dry_run: Annotated[bool, typer.Option(help="Print the server's command line; start nothing.")] = False,
) -> None:
    """Start TRL's vLLM server for a run's model; prints the --vllm-server value `grpo train` takes."""
    from grpo_cli.config import load_settings
    from grpo_cli.serve import serve as run

    flags = dict(
        model=model, max_prompt_length=max_prompt_length, max_completion_length=max_completion_length,
        gpu_memory_utilization=gpu_memory_utilization,  # the server's GPUs are its own
    )  # fmt: skip
    settings = load_settings(str(config) if config else None, flags, announce=False)
    run(settings, host, port, tensor_parallel_size, dry_run)


@app.command("save-lora")
def save_lora(
    source: Annotated[Path, typer.Argument(help="A training output directory or one of its checkpoint-N directories.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the adapter (must be new or empty).")],
    merged: Annotated[
        bool, typer.Option(help="Write the base model with the adapter merged in, 16-bit (bf16; fp16 if trained so).")
    ] = False,
    gguf: Annotated[
        str | None,
        typer.Option(
            help="Write a GGUF file and an Ollama Modelfile: f16, bf16, q8_0 or q4_k_m anywhere, offline; other "
            "K-quants (q5_k_m, ...) on a GPU with llama.cpp built."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty OUT_DIR.")] = False,
    push_to_hub: Annotated[
        str | None, typer.Option(help="Then upload OUT_DIR to this Hub repository (ORG/NAME), in one commit.")
    ] = None,
) -> None:
    """Write a LoRA adapter with its manifest (grpo.json) and model card (README.md)."""
    from grpo_cli.adapter import save_lora as run

    print(f"Saved {run(source, out_dir, merged=merged, gguf=gguf, force=force, push_to_hub=push_to_hub)}")


def offered_tools(specs: list[str] | None, lora: Path | None, trained: dict | None = None):
    """The tools given on the command line (or a recipe's), checked before any model loads, with the rounds and time
    limit of ``trained`` (a run's data settings), else those the adapter was trained with; None: the adapter's own
    tools."""
    from grpo_cli import models, tools
    from grpo_cli.adapter import find_adapter
    from grpo_cli.config import DataSettings

    if not specs:
        return None
    if trained is None:
        trained = (find_adapter(lora)[1] if lora else {}).get("settings", {}).get("data", {})
    limits = {k: trained[k] for k in ("max_tool_calling_iterations", "tool_timeout") if k in trained}
    models.unsloth_first()
    return tools.resolve(DataSettings(tools=specs, **limits))


def read_prompts(prompt: list[str] | None, prompts_file: Path | None) -> list[str]:
    prompts = list(prompt or [])
    if prompts_file:
        from grpo_cli.config import read_text_file

        text = read_text_file(prompts_file, "prompts file", "--prompt TEXT")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise GrpoError(f"prompts file {prompts_file} is empty: put one prompt on each line")
    if not prompts and not sys.stdin.isatty():
        prompts = [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise GrpoError("no prompt given: use --prompt TEXT, --prompts-file FILE, or pipe prompts on stdin")
    return prompts


@app.command()
def infer(
    lora: Annotated[Path | None, typer.Option(help="Adapter directory (from train or save-lora).")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt; repeatable.")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="A text file, one prompt a line.")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: the adapter's, from grpo.json).")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="System prompt (default: the adapter's).")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling.")] = 0.95,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 1024,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same answers.")] = 3407,
    tool: Annotated[
        list[str] | None, typer.Option(help="Offer these tools instead of the adapter's (calculator, file.py:fn, ...).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Answer prompts with the base model and with the adapter, side by side; with tools (the adapter's, or
    --tool), each side's calls and their results."""
    import json

    from rich.console import Console
    from rich.table import Table

    from grpo_cli.generate import Pair, Sampling, transcript

    prompts = read_prompts(prompt, prompts_file)
    toolset = offered_tools(tool, lora)
    with contextlib.redirect_stdout(sys.stderr):  # libraries print while loading: keep stdout for answers
        pair = Pair(model, lora, toolset=toolset)
        print(pair.plan.line())
        template = pair.manifest.get("settings", {}).get("data", {}).get("question_template", "{question}")
        messages = pair.messages([template.replace("{question}", p) for p in prompts], system_prompt)
        sampling = Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        base = [transcript(c) for c in pair.answer(messages, sampling, adapter=False)]
        tuned = [transcript(c) for c in pair.answer(messages, sampling, adapter=True)] if lora else None
        warning = pair.warn_if_inert(pair.texts(prompts[:1], system_prompt)[0])
    if warning:
        print(warning, file=sys.stderr)
    if as_json:
        rows = [
            {"prompt": p, "base": b} | ({"adapter": tuned[i]} if tuned else {})
            for i, (p, b) in enumerate(zip(prompts, base))
        ]
        print(json.dumps(rows, indent=2))
        return
    table = Table(show_lines=True)
    for column in ["Prompt", "Base"] + (["Adapter"] if tuned else []):
        table.add_column(column, overflow="fold")
    for i, (p, b) in enumerate(zip(prompts, base)):
        table.add_row(p, b, *([tuned[i]] if tuned else []))
    Console().print(table)


@app.command("eval")
def evaluate(
    lora: Annotated[Path | None, typer.Option(help="Adapter directory; without it only the base is scored.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="A training recipe: its data set (a reasoning-gym task's task_settings and difficulty), fields, "
            "system prompt, rewards, tools and lengths, where it sets them, over the adapter's.",
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="arithmetic (its held-out split), gsm8k, reasoning-gym:TASK (its held-out items), or a data file."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="The split to score.")] = "test",
    dataset_config: Annotated[str | None, typer.Option(help="A hub data set's configuration.")] = None,
    question_field: Annotated[
        str | None, typer.Option(help="Question column of a data file (default: the recipe's, else question).")
    ] = None,
    answer_field: Annotated[
        str | None, typer.Option(help="Answer column of a data file (default: the recipe's, else answer).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score the first N prompts.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the recipe's (--config), else the adapter's).")
    ] = None,
    system_prompt: Annotated[
        str | None, typer.Option(help="System prompt (default: the recipe's (--config), else the adapter's).")
    ] = None,
    reward: Annotated[
        list[str] | None, typer.Option(help="Rewards to report (default: the recipe's (--config), else the adapter's).")
    ] = None,
    tool: Annotated[
        list[str] | None,
        typer.Option(help="Offer these tools (calculator, file.py:fn, ...) instead of the recipe's or the adapter's."),
    ] = None,
    sample: Annotated[bool, typer.Option(help="Sample (temperature, top-p) instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature, with --sample.")] = 0.8,
    max_tokens: Annotated[int | None, typer.Option(help="Tokens at most (default: the training length).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 3407,
    output_dir: Annotated[Path, typer.Option(help="Where eval.json and eval.csv go.")] = Path("outputs/eval"),
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
) -> None:
    """Score base and adapter on held-out prompts: accuracy, format rate, rewards, length."""
    from rich.console import Console
    from rich.table import Table

    from grpo_cli.config import DataSettings
    from grpo_cli.data import TASK_COLUMN, code_columns, load_examples
    from grpo_cli.evaluate import COLUMNS, check_output_dir, flipped
    from grpo_cli.evaluate import evaluate as run
    from grpo_cli.generate import Pair, Sampling

    # Before any model loads: the output folder, the adapter or recipe, and the data
    check_output_dir(output_dir, overwrite)
    manifest, trained = scored_as(lora, config)
    recipe_tools = trained.get("data", {}).get("tools") if config else None
    own = manifest.get("settings", {}).get("data", {}).get("tools")
    tools = tool or (recipe_tools if recipe_tools and (not lora or recipe_tools != own) else None)  # else the adapter's
    same = not dataset or dataset == trained.get("data", {}).get("dataset")  # the recipe's or adapter's data set
    fields = trained.get("data", {}) if same else {}
    data = DataSettings(
        dataset=dataset or trained.get("data", {}).get("dataset", "arithmetic"),
        split=split,
        dataset_config=dataset_config or trained.get("data", {}).get("dataset_config"),
        question_field=question_field or fields.get("question_field", "question"),
        answer_field=answer_field or fields.get("answer_field", "answer"),
        system_prompt=manifest.get("system_prompt", "") if system_prompt is None else system_prompt,
        question_template=trained.get("data", {}).get("question_template", "{question}"),
        environment=None if tool else trained.get("data", {}).get("environment"),  # its rows keep their columns
        **task_as_trained(dataset, trained.get("data", {})),
        limit=limit,
    )
    first = load_examples(data)[0]
    code = bool(code_columns(first))
    toolset = offered_tools(tools, lora, trained.get("data", {}) if config else None)
    pair = Pair(model or (None if lora else trained.get("model", {}).get("model")), lora, toolset=toolset)
    print(pair.plan.line())
    default = ["code_tests"] if code else ["task_score"] if TASK_COLUMN in first else ["numeric_correctness"]
    rewards = reward or manifest.get("rewards") or default
    length = max_tokens or trained.get("train", {}).get("max_completion_length", 256)
    sampling = Sampling(temperature=temperature, max_tokens=length, seed=seed, greedy=not sample)
    summaries, base, tuned = run(pair, data, sampling, rewards, output_dir, overwrite)

    table = Table(title=f"{len(base)} held-out prompts from {data.dataset} ({'sampled' if sample else 'greedy'})")
    table.add_column("metric")
    for name in summaries:
        table.add_column(name, justify="right")
    if tuned:
        table.add_column("difference", justify="right")
    for key in COLUMNS + [k for k in summaries["base"] if k not in COLUMNS]:
        values = [summaries[name][key] for name in summaries]
        share = key in ("accuracy", "format_rate", "tool_use_rate", "tool_failure_rate")
        cells = [f"{v:.1%}" if share else f"{v:.3f}" for v in values]
        if tuned:
            diff = values[1] - values[0]
            cells.append(f"{diff:+.1%}" if share else f"{diff:+.3f}")
        names = {"accuracy": "pass@1 (every test passes)", "format_rate": "has a ```python block"} if code else {}
        table.add_row(names.get(key, key), *cells)
    console = Console()
    console.print(table)
    if tuned:
        before, _, after = data.question_template.partition("{question}")  # the question alone, not its example
        for key in ("correct", "formatted"):
            for change, b, t in flipped(base, tuned, key):
                question = b["question"].removeprefix(before).removesuffix(after)
                console.print(
                    f"[bold]{change} {key}[/]: {question}\n  base:    {b['completion']!r}\n  adapter: {t['completion']!r}",
                    highlight=False,
                )
    console.print(f"Per-prompt results: {output_dir}/eval.json, {output_dir}/eval.csv")


def scored_as(lora: Path | None, config: Path | None) -> tuple[dict, dict]:
    """What eval scores with where its flags leave it, as (a manifest: system prompt and rewards; a run's settings):
    the adapter's, or with ``config`` a training recipe's, read and checked as `grpo train` reads it (less what only
    training needs), so that the base model alone can be scored on a reasoning-gym task's settings and difficulty.
    With both, the settings the recipe gives replace the adapter's and the rest stay the adapter's."""
    from grpo_cli.adapter import find_adapter
    from grpo_cli.config import load_settings

    manifest = find_adapter(lora)[1] if lora else {}
    if config is None:
        return manifest, manifest.get("settings", {})
    recipe = load_settings(str(config), announce=False, training=False)
    given, settings = set(recipe.given), recipe.to_dict()
    if not lora:
        return {"system_prompt": recipe.data.system_prompt, "rewards": recipe.data.rewards}, settings
    base = manifest.get("base_model")
    if "model" in given and base is not None and recipe.model.model != base:
        raise GrpoError(
            f"the recipe's model {recipe.model.model} is not the adapter's base {base}: drop model from the recipe, "
            "or evaluate without --lora"
        )
    trained = {section: dict(values) for section, values in manifest.get("settings", {}).items()}
    for section in ("model", "data", "train"):
        for key in given & set(settings[section]):
            trained.setdefault(section, {})[key] = settings[section][key]
    said = {k: getattr(recipe.data, k) for k in ("system_prompt", "rewards") if k in given}
    return manifest | said, trained


def task_as_trained(dataset: str | None, trained: dict) -> dict:
    """A reasoning-gym task's settings and difficulty as the adapter was trained on them, where eval scores that
    task (its held-out items, from their own seed)."""
    if dataset and dataset != trained.get("dataset"):
        return {}
    difficulty = trained.get("difficulty")
    if difficulty is None and trained.get("curriculum"):  # the curriculum's start, where its held-out items sat
        difficulty = 0
    return {"task_settings": trained.get("task_settings") or {}, "difficulty": difficulty}


@app.command()
def doctor() -> None:
    """Versions, GPU, the backend `train` will use, and what to fix. Exits 1 when `train` cannot work."""
    from rich.console import Console
    from rich.table import Table

    from grpo_cli.doctor import diagnose

    facts, problems, warnings = diagnose()
    table = Table(show_header=False)
    for name, value in facts:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    for line in warnings:
        console.print(f"[yellow]warning[/]: {line}", highlight=False)
    for line in problems:
        console.print(f"[red]problem[/]: {line}", highlight=False)
    if problems:
        raise typer.Exit(1)
    console.print("[green]ok[/]: `grpo train` can run here")


def quiet_libraries() -> None:
    """Library chatter that asks nothing of the user (weight-loading bars, advisory warnings) stays off."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("bitsandbytes", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    from grpo_cli import threads

    threads.prepare()  # before anything loads torch: its OpenMP reads the thread count and spin once, on load
    if "--debug" not in sys.argv:
        quiet_libraries()
    from grpo_cli import dist
    from grpo_cli.runs import RunFailed

    try:
        app()
    except GrpoError as exc:
        if _state["debug"]:
            raise
        if dist.is_local_main() or not exc.everywhere:  # every process has it: said once a machine
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as exc:  # mid-run: what the completed steps made is saved; the traceback is in error.log
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    finally:
        dist.finish()
