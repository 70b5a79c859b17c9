"""Data sets -> rows of {"prompt": [system, user messages], "answer": str}."""

import csv
import json
import random
from pathlib import Path

from grpo_cli.config import DataSettings
from grpo_cli.errors import GrpoError

GENERATED = "arithmetic"
HELD_OUT = 200  # the first problems of the seeded stream: the test split, never trained on

_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
_THINGS = ["apples", "books", "coins", "marbles", "pens", "shells", "stamps", "stickers"]


def _problem(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    kind = rng.choice("+-*")
    if kind == "+":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
    if kind == "-":
        a = rng.randint(10, 40)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{name} has {a} bags with {b} {thing} in each bag. How many {thing} are there in all?", a * b


def arithmetic_problems(split: str, count: int = 2000, seed: int = 0) -> list[dict]:
    """Seeded one-step word problems with integer answers; ``test`` is disjoint from ``train``.

    >>> arithmetic_problems("test", 1)[0]["answer"].isdigit()
    True
    """
    rng, seen, rows = random.Random(seed), set(), []
    wanted = HELD_OUT if split == "test" else HELD_OUT + count
    while len(rows) < wanted:
        question, answer = _problem(rng)
        if question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": str(answer)})
    return rows[:HELD_OUT] if split == "test" else rows[HELD_OUT:]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise GrpoError(f"{path} line {number} is not valid JSON ({exc.msg}): fix or remove that line") from exc
    return rows


def read_file(path: Path) -> list[dict]:
    """Rows of a local JSONL, JSON (a list, or {"data": [...]}), CSV or Parquet file."""
    if not path.is_file():
        raise GrpoError(f"data file {path} does not exist: give an existing .jsonl, .json, .csv or .parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = json.loads(path.read_text())
            rows = rows.get("data", rows) if isinstance(rows, dict) else rows
        elif suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            raise GrpoError(f"{path}: unknown data format {suffix!r}: use .jsonl, .json, .csv or .parquet")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, OSError) as exc:
        raise GrpoError(f"{path} could not be read as {suffix[1:]} ({type(exc).__name__}): check the file") from exc
    except Exception as exc:
        if isinstance(exc, GrpoError):
            raise
        raise GrpoError(f"{path} could not be read as {suffix[1:]} ({exc}): check the file") from exc
    if not isinstance(rows, list) or not rows:
        raise GrpoError(f"data file {path} holds no rows: give a file with at least one example")
    return rows


def _hub_gsm8k(split: str) -> list[dict]:
    from datasets import load_dataset

    try:
        return list(load_dataset("openai/gsm8k", "main", split=split))
    except Exception as exc:
        raise GrpoError(
            f"could not load openai/gsm8k from the hub ({type(exc).__name__}): "
            "give a local GSM8K file with --dataset path/to/train.jsonl"
        ) from exc


def raw_rows(settings: DataSettings) -> list[dict]:
    if settings.dataset == GENERATED:
        return arithmetic_problems(settings.split)
    if settings.dataset == "gsm8k":
        return _hub_gsm8k(settings.split)
    return read_file(Path(settings.dataset))


def to_examples(rows: list[dict], settings: DataSettings) -> tuple[list[dict], int]:
    """Rows -> chat prompts with answers. GSM8K-style answers keep the text after ``####``;
    in such a set, rows without it are dropped. Returns the examples and how many were dropped."""
    q, a = settings.question_field, settings.answer_field
    missing = [f for f in (q, a) if f not in rows[0]]
    if missing:
        flag = "--question-field" if q in missing else "--answer-field"
        raise GrpoError(
            f"field {missing[0]!r} is not in the data (fields: {', '.join(map(str, rows[0]))}): use {flag} NAME"
        )
    gsm8k = any("####" in str(r.get(a, "")) for r in rows)
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    examples, dropped = [], 0
    for row in rows:
        answer = str(row.get(a, ""))
        if gsm8k:
            if "####" not in answer:
                dropped += 1
                continue
            answer = answer.split("####")[1].strip().replace(",", "")
        examples.append({"prompt": system + [{"role": "user", "content": str(row[q])}], "answer": answer})
    return examples, dropped


def prompt_length(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def load_examples(settings: DataSettings, tokenizer=None) -> list[dict]:
    """The examples for training or evaluation, filtered by ``max_prompt_length`` when a tokenizer is given."""
    examples, dropped = to_examples(raw_rows(settings), settings)
    if dropped:
        print(f"Dropped {dropped} rows without a '####' answer line")
    if settings.limit:
        examples = examples[: settings.limit]
    if tokenizer is not None:
        kept = [e for e in examples if prompt_length(tokenizer, e["prompt"]) <= settings.max_prompt_length]
        if not kept:
            raise GrpoError(
                f"every one of {len(examples)} prompts is longer than max_prompt_length {settings.max_prompt_length} "
                "tokens: raise --max-prompt-length"
            )
        if len(kept) < len(examples):
            print(
                f"Dropped {len(examples) - len(kept)} of {len(examples)} prompts longer than {settings.max_prompt_length} tokens"
            )
        examples = kept
    return examples
