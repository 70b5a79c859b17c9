"""Settings shared by the flags, the YAML recipes and the trainer: defaults < YAML < flags."""

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

from grpo_cli.dist import check_batch
from grpo_cli.errors import GrpoError

SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""

# The embedded 135M model learns with these, not with the 8B reference above: it rarely gets the XML format or the
# arithmetic right by chance, so a one-shot example in the system prompt, a shaped format reward, a reward for
# working with the question's own numbers (without it the model learns to copy the example's answer), a LoRA
# learning rate far above the 8B recipe's, and no reference model (beta 0: no extra forward pass on CPU).
EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_SETTINGS = {
    "system_prompt": "Solve the math problem. Write the calculation, then the result inside <answer></answer> tags.\n"
    "Example:\nQuestion: Mia has 3 cards and gets 4 more. How many cards does Mia have now?\n3 + 4 = 7 <answer>7</answer>",
    "rewards": ["answer_tag", "numbers_used", "numeric_correctness"],
    "lora_rank": 16,
    "max_seq_length": 512,
    "max_prompt_length": 192,
    "max_completion_length": 40,
    "num_generations": 8,
    "per_device_train_batch_size": 16,
    "learning_rate": 3.0e-4,
    "beta": 0.0,
    "warmup_ratio": 0.05,
    "temperature": 0.7,
    "max_steps": 30,
    "save_steps": 10,
}

LOGGERS = ["none", "tensorboard", "wandb", "trackio"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelSettings:
    model: str = EMBEDDED_MODEL
    max_seq_length: int = 1024
    load_in_4bit: bool | None = None  # None: 4-bit on CUDA; 16-bit on CPU, where it measured faster
    lora_rank: int = 32
    lora_alpha: int | None = None  # None: equal to lora_rank, as the reference
    max_lora_rank: int | None = None  # None: equal to lora_rank
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    fast_inference: bool = True  # vLLM generation, where CUDA and vLLM are present
    gpu_memory_utilization: float | None = None  # None: 0.6, or under standby the share Unsloth sizes for it
    vllm_standby: bool = False  # Unsloth's standby: vLLM and training share GPU memory
    vllm_server: str | None = None  # http://HOST:PORT of a vLLM server (`grpo serve`) that generates for training
    random_state: int = 3407


@dataclass
class DataSettings:
    dataset: str = "arithmetic"
    dataset_config: str | None = None  # a hub data set's configuration (gsm8k: main)
    split: str = "train"
    question_field: str = "question"
    answer_field: str = "answer"
    system_prompt: str = SYSTEM_PROMPT
    question_template: str = "{question}"  # the user message around each question, e.g. a worked example first
    max_prompt_length: int = 256
    rewards: list[str] = field(
        default_factory=lambda: ["xmlcount", "soft_format", "strict_format", "integer", "correctness"]
    )
    limit: int | None = None
    eval_dataset: str | None = None  # for evaluation during training; none: this data set
    eval_split: str | None = None  # none: its test split when it has one, else a slice held out from training
    reward_timeout: float | None = 60.0  # seconds a reward call may take; none: no limit
    reward_nan: str = "error"  # or "skip": a NaN/inf reward leaves that sample out of that reward
    sandbox: str = "namespaces"  # how code rewards run model code; "rlimits": resource limits only (weaker, announced)
    tools: list[str] = field(default_factory=list)  # calculator, python, file.py:function or package.module:function
    environment: str | dict | None = None  # file.py:Class, or {name: file.py:Class} picked by the data's environment
    max_tool_calling_iterations: int = 3  # tool rounds a completion may take
    tool_timeout: float | None = 10.0  # seconds a tool call may take before it is stopped and reported as failed
    task_settings: dict = field(default_factory=dict)  # reasoning-gym:TASK: the task's own settings (seed, size, ...)
    difficulty: int | None = None  # reasoning-gym:TASK: the level of the task's curriculum to start at
    curriculum: bool | dict | None = None  # reasoning-gym:TASK: the level follows the model (grpo_cli/curriculum.py)


@dataclass
class TrainSettings:
    output_dir: str = "outputs"
    max_steps: int = 250
    num_generations: int = 6
    per_device_train_batch_size: int = 6
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-6
    max_completion_length: int = 200
    beta: float = 0.04
    epsilon: float = 0.2
    num_iterations: int = 1
    loss_type: str = "grpo"
    temperature: float = 1.0
    seed: int = 3407
    save_steps: int = 250
    warmup_ratio: float = 0.1
    lr_scheduler_type: str = "cosine"
    optim: str = "paged_adamw_8bit"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 0.1
    logging_steps: int = 1
    report_to: str = "none"
    eval_steps: int | None = None  # score the adapter on held-out prompts before step 1 and every N steps
    eval_limit: int = 100  # held-out prompts an evaluation scores
    no_signal_steps: int = 10  # warn when no group has had any reward spread for this many steps in a row
    stop_on_no_signal: bool = False  # then stop, with a checkpoint
    dynamic_sampling: bool = False  # drop groups without reward spread, generate more until the batch is full
    dynamic_sampling_rounds: int = 2  # extra generation rounds a step may take to fill its batch
    extra: dict = field(default_factory=dict)  # any other GRPOConfig field, from a recipe


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    given: list[str] = field(default_factory=list)  # the settings a recipe, the flags or a saved run chose

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cache_dir() -> Path:
    """Where grpo keeps what it makes once: converted models, CPU measurements (GRPO_CACHE moves it)."""
    return Path(os.environ.get("GRPO_CACHE", "~/.cache/grpo")).expanduser()


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]


# GRPOConfig and the classes it inherits its fields from, in the installed trl and transformers
GRPO_CONFIG_CLASSES = [
    ("trl", "trainer/grpo_config.py", "GRPOConfig"),
    ("trl", "trainer/base_config.py", "_BaseConfig"),
    ("transformers", "training_args.py", "TrainingArguments"),
]


def grpo_config_fields() -> set[str]:
    """GRPOConfig's field names, read from the installed sources: importing trl here would come before unsloth,
    and importing unsloth would patch trl, a choice that belongs to the run plan alone."""
    import ast
    import importlib.machinery

    names = set()
    for package, path, name in GRPO_CONFIG_CLASSES:
        spec = importlib.machinery.PathFinder.find_spec(package)  # found, not imported
        if spec is None or not spec.submodule_search_locations:
            raise GrpoError(f"{package} is not installed: run `make install`")
        tree = ast.parse((Path(spec.submodule_search_locations[0]) / path).read_text())
        (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
        names |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return names


def apply(settings: Settings, values: dict, source: str, others: dict) -> None:
    """Set each key on the section that owns it; any other key goes to ``train.extra`` and, with its source, to
    ``others``, to be checked against GRPOConfig once every layer is in (see ``check_others``)."""
    for key, value in values.items():
        section = next((s for s in (settings.model, settings.data, settings.train) if key in _names(type(s))), None)
        if section is not None:
            setattr(section, key, value)
        else:
            settings.train.extra[key] = value
            others[key] = source


def check_others(others: dict) -> None:
    """Keys that are no setting of ours must be GRPOConfig fields."""
    if not others:
        return
    fields = grpo_config_fields()
    for key, source in others.items():
        if key in fields:
            continue
        known = sorted(set(_names(ModelSettings) + _names(DataSettings) + _names(TrainSettings)) | fields)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see `grpo train --help` for the settings"
        raise GrpoError(f"unknown setting {key!r} in {source}: {hint}")


def unsloth_environment(model: ModelSettings, standby: bool) -> None:
    """Settings unsloth reads from the environment when it is first imported: set before that import, where the
    plan has standby (Unsloth's vLLM; elsewhere it would only cost the expandable segments Unsloth gives up for it)."""
    if standby:
        os.environ["UNSLOTH_VLLM_STANDBY"] = "1"
        if model.gpu_memory_utilization is not None:  # Unsloth replaces any other share under standby unless told
            os.environ["UNSLOTH_VLLM_STANDBY_UTIL_OVERRIDE"] = "1"


def read_recipe(path: str) -> dict:
    """The recipe's settings, each of the type its dataclass field declares (GRPOConfig's own are TRL's to check)."""
    import re
    import types
    import typing

    import yaml

    p = Path(path).expanduser()
    if p.is_dir():
        inside = ", ".join(sorted(f.name for f in p.glob("*.yaml"))[:5])
        raise GrpoError(f"recipe {path} is a folder: give the path of a YAML file{f' ({inside})' if inside else ''}")
    if not p.is_file():
        raise GrpoError(f"recipe {path} does not exist: give the path of a YAML file (see recipes/)")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise GrpoError(f"recipe {path} line {line} is not UTF-8 text: save the file as UTF-8") from exc
    except OSError as exc:
        raise GrpoError(f"recipe {path} cannot be read ({exc.strerror}): check its permissions") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise GrpoError(f"recipe {path} is not valid YAML ({problem}{where}): fix the file") from exc
    if not isinstance(values, dict):
        kind = "a list" if isinstance(values, list) else f"the single value {values!r}"
        raise GrpoError(f"recipe {path} holds {kind}: write one `setting: value` a line, as `max_steps: 100`")
    # PyYAML reads 5e-6 (no dot) as text, YAML 1.2 as the number it is
    exponent = re.compile(r"[-+]?(\.\d+|\d+(\.\d*)?)[eE][-+]?\d+")
    hints = {}
    for cls in (ModelSettings, DataSettings, TrainSettings):
        hints |= {k: v for k, v in typing.get_type_hints(cls).items() if k != "extra"}

    def fits(value, kind) -> bool:
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            return any(fits(value, k) for k in typing.get_args(kind))
        if typing.get_origin(kind) is list:
            return isinstance(value, list) and all(fits(v, typing.get_args(kind)[0]) for v in value)
        if kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, kind)

    def described(kind) -> str:
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            return " or ".join(described(k) for k in typing.get_args(kind))
        if typing.get_origin(kind) is list:
            return f"a list of {described(typing.get_args(kind)[0])} ([a, b])"
        names = {int: "an integer", float: "a number", bool: "true or false", str: "text", type(None): "null"}
        return names.get(kind, kind.__name__)

    for key, value in list(values.items()):
        if not isinstance(key, str):
            raise GrpoError(f"recipe {path}: {key!r} is no setting name: write `setting: value`, as `max_steps: 100`")
        if isinstance(value, str) and exponent.fullmatch(value) and not fits(value, hints.get(key, float)):
            value = values[key] = float(value)
        if key in hints and not fits(value, hints[key]):
            listed = typing.get_origin(hints[key]) is list and isinstance(value, str)
            fix = f"write it as a list, {key}: [{value}]" if listed else "change that line"
            raise GrpoError(f"recipe {path}: {key} must be {described(hints[key])}, got {value!r}: {fix}")
    return values


def read_text_file(path: Path, what: str, instead: str) -> str:
    """A text file a user names, or one line saying what is wrong with it."""
    path = path.expanduser()
    if path.is_dir():
        raise GrpoError(f"{what} {path} is a folder: give a text file, or {instead}")
    if not path.is_file():
        raise GrpoError(f"{what} {path} does not exist: give a text file, or {instead}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GrpoError(f"{what} {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from exc


def load_settings(
    config: str | None = None,
    flags: dict | None = None,
    saved: dict | None = None,
    announce: bool = True,
    training: bool = True,
) -> Settings:
    """Defaults (or a saved run's settings), then the YAML recipe, then the flags given (None: not given). On the
    embedded model the defaults are the settings it learns with (EMBEDDED_SETTINGS), said in one line. ``training``
    False (a recipe read for `grpo eval`): what only training needs is not checked."""
    settings, others = Settings(), {}
    recipe = read_recipe(config) if config else {}
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    for section in ("model", "data", "train") if saved else ():
        apply(settings, {k: v for k, v in saved[section].items() if k != "extra"}, "the saved run", others)
        settings.train.extra.update(saved[section].get("extra", {}))
    if not saved and flags.get("model", recipe.get("model", EMBEDDED_MODEL)) == EMBEDDED_MODEL:
        apply(settings, EMBEDDED_SETTINGS, "the embedded model's settings", others)
        if announce:
            print(embedded_line({**recipe, **flags}))
    apply(settings, recipe, config, others)
    apply(settings, flags, "the command line", others)
    settings.given = sorted(set(recipe) | set(flags) | ({k for sec in ("model", "data", "train") for k in saved[sec]}
                                                          if saved else set()))  # fmt: skip
    follow_choices(settings, announce)
    check_others(others)
    prompt = settings.data.system_prompt
    if prompt.startswith("@"):
        settings.data.system_prompt = read_text_file(Path(prompt[1:]), "system prompt file", "--system-prompt TEXT")
    validate(settings, training)
    return settings


def follow_choices(settings: Settings, announce: bool = True) -> None:
    """Defaults the user never chose follow the settings they did: the model's seed follows --seed, and the
    context (max_seq_length) grows to hold the prompt and completion lengths asked for, or the prompt length
    shrinks to what a chosen context leaves."""
    m, d, t, given = settings.model, settings.data, settings.train, set(settings.given)
    if "random_state" not in given:
        m.random_state = t.seed  # Unsloth's LoRA init follows --seed, as TRL's sampling does
    needed = d.max_prompt_length + t.max_completion_length
    if needed <= m.max_seq_length:
        return
    said = None
    if "max_seq_length" not in given:
        m.max_seq_length = needed
        said = f"max_seq_length {needed}: max_prompt_length {d.max_prompt_length} + max_completion_length "
        said += f"{t.max_completion_length} (set max_seq_length to choose another)"
    elif "max_prompt_length" not in given and m.max_seq_length > t.max_completion_length:
        d.max_prompt_length = m.max_seq_length - t.max_completion_length
        said = f"max_prompt_length {d.max_prompt_length}: what max_seq_length {m.max_seq_length} leaves after "
        said += f"{t.max_completion_length} completion tokens"
    if said and announce:
        print(said)


def embedded_line(given: dict) -> str:
    """One line on what a run on the embedded model starts from."""
    e = EMBEDDED_SETTINGS
    replaced = sorted(key for key in set(e) & set(given) if given[key] != e[key])
    return (
        f"{EMBEDDED_MODEL}: starting from the settings it learns with, not the 8B reference (one-shot system prompt; "
        f"rewards {', '.join(e['rewards'])}; lr {e['learning_rate']:g}; {e['max_completion_length']}-token "
        f"completions; {e['max_steps']} steps)" + (f"; replaced here: {', '.join(replaced)}" if replaced else "")
    )


def validate(s: Settings, training: bool = True) -> None:
    """Fail before any model is loaded, with a message that says what to change."""
    t, m, d = s.train, s.model, s.data
    for name, value in [
        ("max_steps", t.max_steps),
        ("max_completion_length", t.max_completion_length),
        ("max_prompt_length", d.max_prompt_length),
        ("max_seq_length", m.max_seq_length),
        ("per_device_train_batch_size (--batch-size)", t.per_device_train_batch_size),
        ("gradient_accumulation_steps (--grad-accum)", t.gradient_accumulation_steps),
        ("num_iterations", t.num_iterations),
        ("lora_rank", m.lora_rank),
        ("save_steps", t.save_steps),
        ("no_signal_steps", t.no_signal_steps),
        ("eval_limit", t.eval_limit),
    ]:
        if value is None or value <= 0:
            raise GrpoError(f"{name} must be a positive integer, got {value}")
    if t.learning_rate <= 0:
        raise GrpoError(f"learning_rate must be positive, got {t.learning_rate}: try 5e-6 (the reference)")
    if t.num_generations < 2:
        raise GrpoError(
            f"num_generations must be at least 2, got {t.num_generations}: "
            "GRPO compares completions within a group (the reference uses 6)"
        )
    check_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_generations)
    if m.gpu_memory_utilization is not None and not 0 < m.gpu_memory_utilization <= 1:
        raise GrpoError(
            f"gpu_memory_utilization must be in (0, 1], got {m.gpu_memory_utilization}: the reference uses 0.6"
        )
    max_rank = m.max_lora_rank or m.lora_rank
    if m.lora_rank > max_rank:
        raise GrpoError(
            f"lora_rank {m.lora_rank} is above max_lora_rank {max_rank}: lower --lora-rank or raise max_lora_rank"
        )
    if d.max_prompt_length + t.max_completion_length > m.max_seq_length:
        raise GrpoError(
            f"max_prompt_length {d.max_prompt_length} + max_completion_length {t.max_completion_length} "
            f"exceeds max_seq_length {m.max_seq_length}: lower one of them or raise max_seq_length"
        )
    if d.reward_nan not in ("error", "skip"):
        raise GrpoError(f"reward_nan must be error or skip, got {d.reward_nan!r}")
    if d.sandbox not in ("namespaces", "rlimits"):
        raise GrpoError(f"sandbox must be namespaces or rlimits (resource limits only, weaker), got {d.sandbox!r}")
    if d.reward_timeout is not None and d.reward_timeout <= 0:
        raise GrpoError(
            f"reward_timeout must be a positive number of seconds, got {d.reward_timeout}: the default is 60"
        )
    if "{question}" not in d.question_template:
        raise GrpoError("question_template has no {question}: write where the question goes, as 'Q: {question}'")
    if d.max_tool_calling_iterations is None or d.max_tool_calling_iterations < 1:
        raise GrpoError(
            f"max_tool_calling_iterations must be a positive integer, got {d.max_tool_calling_iterations}: try 3"
        )
    if d.tool_timeout is not None and d.tool_timeout <= 0:
        raise GrpoError(f"tool_timeout must be a positive number of seconds, got {d.tool_timeout}: the default is 10")
    if isinstance(d.environment, dict) and not all(isinstance(v, str) for v in d.environment.values()):
        raise GrpoError("environment: give each name a file.py:Class or package.module:Class, as {math: env.py:Math}")
    if t.eval_steps is not None and t.eval_steps <= 0:
        raise GrpoError(f"eval_steps must be a positive integer, got {t.eval_steps}: try 10")
    if m.vllm_server is not None and not m.vllm_server.startswith(("http://", "https://")):
        raise GrpoError(f"vllm_server {m.vllm_server!r} is no URL: give http://HOST:PORT, as `grpo serve` prints it")
    if t.dynamic_sampling_rounds is None or t.dynamic_sampling_rounds < 0:
        raise GrpoError(
            f"dynamic_sampling_rounds must be 0 or more extra generation rounds, got {t.dynamic_sampling_rounds}: try 2"
        )
    if d.curriculum:
        from grpo_cli.curriculum import check_curriculum

        check_curriculum(d, d.rewards, t if training else None)
    if (d.task_settings or d.difficulty is not None) and not d.dataset.startswith("reasoning-gym:"):
        raise GrpoError(
            f"task_settings and difficulty are a reasoning-gym task's: {d.dataset} is none, use --dataset reasoning-gym:TASK"
        )
    if t.report_to not in LOGGERS:
        raise GrpoError(f"report_to {t.report_to!r} is not a logger grpo knows: use {', '.join(LOGGERS)}")
    if not d.rewards:
        raise GrpoError("no reward given: add --reward NAME (see `grpo train --help` for the names)")
