"""Data sets -> rows of {"prompt": [system, user messages], "answer": str}."""

import glob
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


BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SAVED = ("dataset_dict.json", "state.json")  # a folder written by save_to_disk


def _first_bad_json_line(path: Path) -> int | None:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError:
                return number
    return None


def _from_files(pattern: str) -> list[dict]:
    """Local data files (one, or several through a glob) of one format, with ``datasets``."""
    from datasets import load_dataset

    where = str(Path(pattern).expanduser())
    files = sorted(glob.glob(where)) if glob.has_magic(pattern) else [where]
    if not files or not Path(files[0]).is_file():
        what = "no file matches" if glob.has_magic(pattern) else "does not exist"
        raise GrpoError(f"data file {pattern} {what}: give an existing {', '.join(BUILDERS)} file, or a glob of them")
    suffixes = {Path(f).suffix.lower() for f in files}
    if len(suffixes) > 1 or (suffix := suffixes.pop()) not in BUILDERS:
        raise GrpoError(
            f"{pattern}: unknown data format {', '.join(sorted({Path(f).suffix for f in files}))!r}: "
            f"use {', '.join(BUILDERS)} files, one format at a time"
        )
    if all(Path(f).stat().st_size == 0 for f in files):
        raise GrpoError(f"data file {pattern} holds no rows: give a file with at least one example")
    options = {}
    if suffix == ".json" and _one_object_with_data(Path(files[0])):
        options["field"] = "data"  # {"data": [...]}; a .json of one object a line is read as JSON lines
    try:
        return list(load_dataset(BUILDERS[suffix], data_files=files, split="train", **options))
    except Exception as exc:
        if suffix == ".jsonl" and (line := next(filter(None, map(_first_bad_json_line, map(Path, files))), None)):
            bad = next(f for f in files if _first_bad_json_line(Path(f)))
            raise GrpoError(f"{bad} line {line} is not valid JSON: fix or remove that line") from exc
        cause = str(exc.__cause__ or exc).splitlines()[0][:120]
        raise GrpoError(f"{pattern} could not be read as {suffix[1:]} ({cause}): check the file") from exc


def _one_object_with_data(path: Path) -> bool:
    try:
        whole = json.loads(path.read_text())
    except ValueError:
        return False
    return isinstance(whole, dict) and isinstance(whole.get("data"), list)


def _pick_split(data, split: str, where: str):
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict):
        return data
    if split not in data:
        raise GrpoError(f"{where} has no split {split!r} (splits: {', '.join(data)}): use --split NAME")
    return data[split]


def _from_folder(path: Path, split: str, config: str | None) -> list[dict]:
    """A folder written by ``save_to_disk``, or a Hub-style dataset folder (data files named by split)."""
    from datasets import load_dataset, load_from_disk

    if any((path / name).is_file() for name in SAVED):
        return list(_pick_split(load_from_disk(str(path)), split, str(path)))
    try:
        data = load_dataset(str(path), config)
    except Exception as exc:
        raise GrpoError(
            f"{path} is not a dataset folder ({str(exc).splitlines()[0][:120]}): give a folder written by "
            "save_to_disk, one with data files (.jsonl, .csv, .parquet, ...), or a data file"
        ) from exc
    return list(_pick_split(data, split, str(path)))


def _from_hub(name: str, config: str | None, split: str) -> list[dict]:
    from datasets import load_dataset
    from huggingface_hub import constants

    instead = "download it where the hub is reachable (save_to_disk) and pass that folder, or give data files"
    if constants.HF_HUB_OFFLINE:
        cached = None
        try:  # a data set already in the local cache still loads offline
            cached = load_dataset(name, config, split=split)
        except Exception:
            pass
        if cached is None:
            raise GrpoError(f"{name} is a hub data set and the hub is offline here (HF_HUB_OFFLINE): {instead}")
        return list(cached)
    try:
        return list(load_dataset(name, config, split=split))
    except Exception as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise GrpoError(f"could not load {name} from the hub ({type(exc).__name__}: {first}): {instead}") from exc


def raw_rows(settings: DataSettings) -> list[dict]:
    """Rows of the data set: the generated one, a hub id (``gsm8k`` is openai/gsm8k), a dataset folder, or data
    files; through ``datasets`` for all but the generated one."""
    name, config = settings.dataset, settings.dataset_config
    if name == GENERATED:
        return arithmetic_problems(settings.split)
    if name == "gsm8k":
        name, config = "openai/gsm8k", config or "main"
    path = Path(name).expanduser()
    if path.is_dir():
        rows = _from_folder(path, settings.split, config)
    elif glob.has_magic(name) or path.suffix.lower() in BUILDERS or path.exists() or name.startswith((".", "/", "~")):
        rows = _from_files(name)
    elif name.count("/") <= 1 and not name.startswith((".", "~", "/")):
        rows = _from_hub(name, config, settings.split)
    else:
        raise GrpoError(f"data set {name} does not exist: give a hub id, a dataset folder or data files")
    if not rows:
        raise GrpoError(f"data set {settings.dataset} holds no rows: give one with at least one example")
    return rows


def to_examples(rows: list[dict], settings: DataSettings) -> tuple[list[dict], int]:
    """Rows -> chat prompts with answers. Rows that hold a chat ``prompt`` already (TRL's conversational format)
    keep it, with the system prompt added when they have none. GSM8K-style answers keep the text after ``####``;
    in such a set, rows without it are dropped. Returns the examples and how many were dropped."""
    q, a = settings.question_field, settings.answer_field
    conversational = isinstance(rows[0].get("prompt"), list)
    missing = [f for f in ((a,) if conversational else (q, a)) if f not in rows[0]]
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
        if conversational:
            messages = list(row["prompt"])
            prompt = messages if any(m.get("role") == "system" for m in messages) else system + messages
        else:
            prompt = system + [{"role": "user", "content": str(row[q])}]
        examples.append({"prompt": prompt, "answer": answer})
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


def eval_examples(settings: DataSettings, train: list[dict], limit: int, seed: int, tokenizer=None):
    """Held-out prompts for evaluation during training -> (examples, the training examples left, a description).
    The eval data set or split when given; else the data set's test split when it has one; else a seeded slice
    of the training examples, which training then does without."""
    import dataclasses

    named = settings.eval_dataset or settings.eval_split
    source = dataclasses.replace(
        settings, dataset=settings.eval_dataset or settings.dataset, split=settings.eval_split or "test", limit=limit
    )
    path = Path(source.dataset).expanduser()
    splits = source.dataset == GENERATED or path.is_dir() or not (path.suffix or glob.has_magic(source.dataset))
    if named or splits:
        try:
            return load_examples(source, tokenizer), train, f"{source.dataset} ({source.split})"
        except GrpoError:
            if named:
                raise
    rng = random.Random(seed)
    order = rng.sample(range(len(train)), len(train))
    held = set(order[: min(limit, len(train) // 5)])  # at most a fifth of the training data
    if not held:
        raise GrpoError(f"{len(train)} training prompts leave none to hold out for evaluation: give --eval-dataset")
    kept = [e for i, e in enumerate(train) if i not in held]
    return [train[i] for i in sorted(held)], kept, f"{len(held)} prompts held out from the training data (seed {seed})"
