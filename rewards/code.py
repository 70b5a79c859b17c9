"""Verifiable code rewards: the completion's code runs against the row's tests in the sandbox (grpo_cli/sandbox.py).

The code is the completion's last fenced Python block (```python, ```py or a bare ```) that defines the function
under test, else its last Python block, else the whole text: a usage example after the solution is not taken for
it. Rows bring their tests as columns: HumanEval's ``test`` and ``entry_point`` (with an optional ``setup``
run first), MBPP's ``test_list`` of asserts, or ``inputs`` and ``outputs`` for stdin/stdout cases. A failure of the
sandbox itself, or a row without the columns a reward needs, raises: the run stops with the reason, it never
scores 0 in silence. The tests are judged in a process of their own, apart from the completion's code (see
grpo_cli/sandbox.py): only plain data comes back from the code, and the verdict on a pipe the code never holds. Each reward counts in ``counts`` the completions without a code block and the programs that
ran past the time limit.
"""

import ast
import builtins
import re
from collections import Counter

from grpo_cli import sandbox
from grpo_cli.sandbox import Program
from rewards.reference import completion_text

FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
PYTHON = {"", "python", "py", "python3"}


def code_block(text: str, defines: str | None = None) -> str | None:
    """The last fenced Python block (an unclosed one at the end counts: the completion was cut off), or None. With
    ``defines``, the last block that defines that function, when one does: a usage example after the solution is
    not the solution.

    >>> code_block("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    >>> code_block("```python\\ndef f(): return 1\\n```\\nUse it:\\n```python\\nprint(f())\\n```", defines="f")
    'def f(): return 1\\n'
    >>> code_block("no fence"), code_block("```bash\\nls\\n```")
    (None, None)
    """
    blocks = [body for lang, body in FENCE.findall(text) if lang.lower() in PYTHON]
    if defines:
        defining = [b for b in blocks if re.search(rf"^\s*def\s+{re.escape(defines)}\s*\(", b, re.MULTILINE)]
        blocks = defining or blocks
    return blocks[-1] if blocks else None


def completion_code(completion, defines: str | None = None) -> str:
    """The code to run: the last Python block (see ``code_block``), or the whole text.

    >>> completion_code([{"role": "assistant", "content": "x = 1"}])
    'x = 1'
    """
    text = completion_text(completion)
    block = code_block(text, defines)
    return text if block is None else block


def called_function(asserts) -> str | None:
    """The function MBPP-style asserts call: the first call that is not a builtin.

    >>> called_function(["assert set(similar_elements((3, 4), (4, 5))) == {4}"])
    'similar_elements'
    """
    for line in asserts:
        try:
            tree = ast.parse(line)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in vars(builtins):
                return node.func.id
    return None


def _columns(reward: str, kwargs: dict, names: tuple[str, ...], n: int) -> dict:
    missing = [name for name in names if name not in kwargs]
    if missing:
        raise ValueError(
            f"{reward} needs the data set's {' and '.join(repr(m) for m in missing)} column: "
            f"got {', '.join(sorted(kwargs)) or 'no columns'}"
        )
    return {
        name: list(kwargs[name]) if isinstance(kwargs[name], (list, tuple)) else [kwargs[name]] * n for name in names
    }


def _run(programs: list[Program], counts: Counter):
    """Results for the programs, each distinct program run once (a group often repeats a completion)."""
    unique = list(dict.fromkeys(programs))
    results = dict(zip(unique, sandbox.current().run_all(unique)))
    counts["programs"] += len(unique)
    counts["timed_out"] += sum(r.timed_out for r in results.values())
    return [results[p] for p in programs]


def _count_blocks(completions, counts: Counter) -> None:
    counts["completions"] += len(completions)
    counts["no_code_block"] += sum(code_block(completion_text(c)) is None for c in completions)


def _test_program(code: str, row: dict, i: int) -> Program:
    test, asserts = row.get("test"), row.get("test_list")
    setup = row.get("setup") or ""
    if test:
        entry = row.get("entry_point")
        if not isinstance(entry, str) or not entry.isidentifier():
            raise ValueError(f"code_tests: row {i} has a 'test' but its 'entry_point' is {entry!r}: give the name")
        if "check" not in test:
            raise ValueError(f"code_tests: row {i}'s 'test' defines no check(candidate): write it as HumanEval does")
        return Program(code, setup=setup, test=test, entry_point=entry)
    if asserts:
        if isinstance(asserts, str):
            asserts = [asserts]
        return Program(code, setup=setup, asserts=tuple(asserts))
    raise ValueError(f"code_tests: row {i} has neither a 'test' (with 'entry_point') nor a 'test_list' of asserts")


def code_tests_reward(prompts, completions, **kwargs) -> list[float]:
    """HumanEval rows (``test``, ``entry_point``): 1.0 when ``check(entry_point)`` returns after the code; MBPP rows
    (``test_list``): the share of the asserts that pass. A run that ends early (``sys.exit(0)``, ``os._exit(0)``, an
    exit handler) or past the time limit scores 0, and so does a result that only looks right (an ``__eq__`` that is
    always true, a subclass, patched builtins): the judge compares plain data with its own builtins.

    >>> test = "def check(candidate):\\n    assert candidate(2, 3) == 5\\n"
    >>> code_tests_reward(None, ["```python\\ndef add(a, b):\\n    return a + b\\n```", "def add(a, b): return a"],
    ...                   test=[test] * 2, entry_point=["add"] * 2)
    [1.0, 0.0]
    """
    n = len(completions)
    keys = [k for k in ("test", "entry_point", "test_list", "setup") if k in kwargs]
    if "test" not in keys and "test_list" not in keys:
        raise ValueError(
            "code_tests needs the data set's 'test' and 'entry_point' columns (HumanEval) or 'test_list' (MBPP): "
            f"got {', '.join(sorted(kwargs)) or 'no columns'}"
        )
    columns = _columns("code_tests", kwargs, tuple(keys), n)
    rows = [{k: columns[k][i] for k in keys} for i in range(n)]
    programs = []
    for i, (completion, row) in enumerate(zip(completions, rows)):
        name = row.get("entry_point") if row.get("test") else called_function(row.get("test_list") or [])
        program = _test_program(completion_code(completion, name), row, i)
        # asserts that call builtins alone (a task whose function is named `pow`, say) would be answered by the
        # judge's own builtins, whatever the code: such a row cannot be judged, and scores 0
        programs.append(program if program.test is not None or name is not None else None)
    _count_blocks(completions, code_tests_reward.counts)
    if None in programs:
        code_tests_reward.counts["unjudgeable"] += programs.count(None)
    results = iter(_run([p for p in programs if p is not None], code_tests_reward.counts))
    scores = []
    for program in programs:
        if program is None:
            scores.append(0.0)
            continue
        result = next(results)
        if program.test is not None:
            scores.append(1.0 if result.passed else 0.0)
        else:
            scores.append(result.asserts_passed / len(program.asserts))
    return scores


code_tests_reward.counts = Counter()


def same_output(got: str, expected: str) -> bool:
    """Equal up to trailing spaces on each line and trailing blank lines.

    >>> same_output("3 \\n4\\n\\n", "3\\n4"), same_output("3", "4")
    (True, False)
    """

    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]

    return lines(got) == lines(expected)


def code_io_reward(prompts, completions, **kwargs) -> list[float]:
    """The share of the row's stdin/stdout cases (``inputs``, ``outputs``) the program answers exactly.

    >>> code_io_reward(None, ["print(int(input()) * 2)", "print(4)"], inputs=[["2", "5"]] * 2,
    ...                outputs=[["4", "10"]] * 2)
    [1.0, 0.5]
    """
    n = len(completions)
    columns = _columns("code_io", kwargs, ("inputs", "outputs"), n)
    cases, programs = [], []
    for i, (completion, inputs, outputs) in enumerate(zip(completions, columns["inputs"], columns["outputs"])):
        inputs, outputs = ([v] if isinstance(v, str) else list(v or []) for v in (inputs, outputs))
        if not inputs or len(inputs) != len(outputs):
            raise ValueError(f"code_io: row {i} has {len(inputs)} inputs and {len(outputs)} outputs: give one per case")
        code = completion_code(completion)
        cases.append(outputs)
        programs += [Program(code, stdin=stdin) for stdin in inputs]
    _count_blocks(completions, code_io_reward.counts)
    results = iter(_run(programs, code_io_reward.counts))
    scores = []
    for outputs in cases:
        passed = [(r := next(results)).returncode == 0 and same_output(r.stdout, want) for want in outputs]
        scores.append(sum(passed) / len(outputs))
    return scores


code_io_reward.counts = Counter()


def code_block_reward(completions, **kwargs) -> list[float]:
    """0.5 for a fenced Python block, 0.5 more when it parses: a format reward for models that rarely write one.

    >>> code_block_reward(["```python\\ndef f(): return 1\\n```", "```python\\ndef f(:\\n```", "f = 1"])
    [1.0, 0.5, 0.0]
    """
    scores = []
    for completion in completions:
        block = code_block(completion_text(completion))
        if block is None:
            scores.append(0.0)
            continue
        try:
            ast.parse(block)
        except (SyntaxError, ValueError):
            scores.append(0.5)
        else:
            scores.append(1.0)
    return scores
