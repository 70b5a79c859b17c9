"""The code rewards and code data: code extraction, HumanEval, MBPP and stdin/stdout rows, the generated function
tasks, a sandbox failure as an error, and reward hacks that score 0. The rewards run in the real sandbox (skipped
where there is none)."""

import os
import time

import pytest

from grpo_cli import sandbox
from grpo_cli.config import DataSettings
from grpo_cli.data import CODE_SYSTEM_PROMPT, code_columns, function_tasks, load_examples
from grpo_cli.errors import GrpoError
from rewards import REWARDS, RewardError, checked, resolve
from rewards.code import code_block, code_block_reward, code_io_reward, code_tests_reward, completion_code


@pytest.fixture(scope="module")
def box():
    resolved = sandbox.resolve()
    if resolved.problem and not os.environ.get("GRPO_REQUIRE_SANDBOX"):
        pytest.skip(f"no sandbox here: {resolved.problem}")
    assert resolved.problem is None, resolved.problem
    return resolved


@pytest.fixture
def sandboxed(box, monkeypatch):
    monkeypatch.setattr(sandbox, "_current", box)
    return box


@pytest.mark.parametrize(
    "text, code",
    [
        ("```python\nx = 1\n```", "x = 1\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```\nx = 1\n```", "x = 1\n"),
        ("```Python3 title\nx = 1\n```", "x = 1\n"),
        ("first\n```python\nx = 1\n```\nthen\n```python\nx = 2\n```\ndone", "x = 2\n"),
        ("```python\nx = 1\n```\n```bash\nls\n```", "x = 1\n"),
        ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # cut off at the length limit
        ("```bash\nls\n```", None),
        ("x = 1", None),
    ],
)
def test_the_last_python_block_is_the_code(text, code):
    assert code_block(text) == code
    assert completion_code([{"role": "assistant", "content": text}]) == (text if code is None else code)


def test_the_block_that_defines_the_function_wins_over_a_later_usage_example(sandboxed):
    answer = "```python\ndef add(a, b):\n    return a + b\n```\nUse it:\n```python\nprint(add(2, 3))\n```"
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    assert code_tests_reward(None, [answer], test=[test], entry_point=["add"]) == [1.0]
    assert code_tests_reward(None, [answer], test_list=[["assert set([add(2, 3)]) == {5}"]]) == [1.0]
    assert code_block(answer) == "print(add(2, 3))\n"


def test_the_code_rewards_are_in_the_registry():
    for name in ("code_tests", "code_io", "code_block"):
        assert resolve(name)[0] is REWARDS[name]


def test_code_block_reward_needs_no_sandbox():
    texts = ["```python\ndef f(): return 1\n```", "```python\ndef f(:\n```", "def f(): return 1"]
    assert code_block_reward([[{"role": "assistant", "content": t}] for t in texts]) == [1.0, 0.5, 0.0]


def test_humaneval_canonical_solutions_all_pass_and_stubs_all_fail(sandboxed):
    examples = load_examples(DataSettings(dataset="humaneval", split="test", system_prompt=CODE_SYSTEM_PROMPT))
    assert len(examples) == 164
    columns = {k: [e[k] for e in examples] for k in ("test", "entry_point", "setup")}
    solutions = [[{"role": "assistant", "content": f"```python\n{e['answer']}```"}] for e in examples]
    stubs = [f"```python\n{e['setup']}    pass\n```" for e in examples]
    started = time.monotonic()
    assert code_tests_reward(None, solutions, **columns) == [1.0] * 164
    seconds = time.monotonic() - started
    assert code_tests_reward(None, stubs, **columns) == [0.0] * 164
    print(f"HumanEval: 164 canonical solutions scored in {seconds:.1f}s, {sandboxed.workers} at a time")


def test_humaneval_is_for_evaluation_only():
    with pytest.raises(GrpoError, match="humaneval has only a test split .* train on mbpp or functions"):
        load_examples(DataSettings(dataset="humaneval", split="train"))


@pytest.mark.parametrize("name", ["functions", "two-step-functions", "harder-functions"])
def test_function_tasks_are_seeded_disjoint_and_their_references_pass(sandboxed, name):
    kind = {"two_step": name == "two-step-functions", "harder": name == "harder-functions"}
    train, test = function_tasks("train", **kind), function_tasks("test", **kind)
    assert function_tasks("test", **kind) == test and len(test) == 100 and len(train) > (80 if kind["harder"] else 200)
    assert function_tasks("test", seed=1, **kind) != test
    assert not {t["question"] for t in train} & {t["question"] for t in test}
    examples = load_examples(DataSettings(dataset=name, split="test", system_prompt=CODE_SYSTEM_PROMPT))
    assert examples[0]["prompt"][0] == {"role": "system", "content": CODE_SYSTEM_PROMPT}
    assert sorted(examples[0]) == ["answer", "entry_point", "prompt", "test"]
    references = [f"```python\n{e['answer']}```" for e in examples]
    wrong = [f"```python\ndef {e['entry_point']}(*args):\n    return None\n```" for e in examples]
    columns = {k: [e[k] for e in examples] for k in ("test", "entry_point")}
    assert code_tests_reward(None, references, **columns) == [1.0] * 100
    assert code_tests_reward(None, wrong, **columns) == [0.0] * 100


MBPP_ROW = {
    "task_id": 2,
    "text": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
    "test_list": [
        "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
        "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == set((3, 4))",
        "assert set(similar_elements((11, 12, 14, 13), (17, 15, 14, 13))) == set((13, 14))",
    ],
    "test_setup_code": "",
    "challenge_test_list": [],
}


def test_mbpp_shaped_rows_from_a_file_score_the_share_of_asserts(sandboxed, write_jsonl):
    path = write_jsonl([MBPP_ROW])
    (example,) = load_examples(DataSettings(dataset=str(path), system_prompt=CODE_SYSTEM_PROMPT))
    assert example["prompt"][-1]["content"] == (
        f"{MBPP_ROW['text']}\nYour code should pass this test:\n{MBPP_ROW['test_list'][0]}"
    )
    assert example["answer"] == MBPP_ROW["code"] and example["setup"] == ""
    half = "def similar_elements(a, b):\n    return (4, 5) if 5 in a else ()"
    completions = [f"```python\n{MBPP_ROW['code']}\n```", half, "def other(): pass"]
    values = code_tests_reward(None, completions, test_list=[example["test_list"]] * 3, setup=[""] * 3)
    assert values == [1.0, pytest.approx(1 / 3), 0.0]


def test_humaneval_shaped_rows_from_a_file_show_the_function_and_run_its_prompt_first(sandboxed, write_jsonl):
    prompt = 'import math\n\n\ndef area(r):\n    """The area of a circle of radius r."""\n'
    test = "def check(candidate):\n    assert abs(candidate(1) - 3.14159) < 1e-3\n"
    path = write_jsonl([{"task_id": "x/0", "prompt": prompt, "entry_point": "area", "test": test}])
    (example,) = load_examples(DataSettings(dataset=str(path), system_prompt=CODE_SYSTEM_PROMPT))
    assert example["prompt"][-1]["content"].endswith(f"```python\n{prompt.strip()}\n```")
    assert example["setup"] == prompt
    uses_the_import = "```python\ndef area(r):\n    return math.pi * r * r\n```"  # math comes from the prompt
    assert code_tests_reward(None, [uses_the_import], test=[test], entry_point=["area"], setup=[prompt]) == [1.0]


def test_stdin_stdout_cases(sandboxed, write_jsonl):
    rows = [{"question": "Print the double of the number read.", "inputs": ["2\n", "5\n"], "outputs": ["4\n", "10"]}]
    (example,) = load_examples(DataSettings(dataset=str(write_jsonl(rows)), system_prompt=CODE_SYSTEM_PROMPT))
    assert example["answer"] == "" and example["inputs"] == ["2\n", "5\n"]
    completions = ["```python\nprint(int(input()) * 2)\n```", "print(4)", "import sys\nprint(4)\nsys.exit(1)"]
    values = code_io_reward(None, completions, inputs=[example["inputs"]] * 3, outputs=[example["outputs"]] * 3)
    assert values == [1.0, 0.5, 0.0]


def test_rows_without_tests_are_a_reward_error_not_a_zero():
    with pytest.raises(RewardError, match="code_tests needs the data set's 'test' and 'entry_point' columns"):
        checked(REWARDS["code_tests"])(["p"], ["x = 1"], answer=["1"])
    with pytest.raises(RewardError, match="code_io needs the data set's 'inputs' and 'outputs' column"):
        checked(REWARDS["code_io"])(["p"], ["x = 1"], answer=["1"])
    with pytest.raises(RewardError, match="defines no check"):
        checked(REWARDS["code_tests"])(["p"], ["x = 1"], test=["assert True"], entry_point=["f"])
    with pytest.raises(RewardError, match="has 2 inputs and 1 outputs"):
        checked(REWARDS["code_io"])(["p"], ["x = 1"], inputs=[["1", "2"]], outputs=[["1"]])


def test_counts_of_missing_code_blocks_and_timeouts(monkeypatch, box):
    quick = sandbox.resolve(limits=sandbox.Limits(wall_seconds=1, cpu_seconds=1))
    monkeypatch.setattr(sandbox, "_current", quick)
    monkeypatch.setattr(code_tests_reward, "counts", type(code_tests_reward.counts)())
    test = "def check(candidate):\n    assert candidate() == 1\n"
    completions = [
        "```python\ndef f():\n    return 1\n```",
        "def f():\n    while True: pass",
        "def f():\n    return 1\n",
    ]
    assert code_tests_reward(None, completions, test=[test] * 3, entry_point=["f"] * 3) == [1.0, 0.0, 1.0]
    assert code_tests_reward.counts == {"completions": 3, "no_code_block": 2, "programs": 2, "timed_out": 1}


def test_code_columns_are_recognised_only_in_full():
    assert code_columns({"test": "...", "entry_point": "f", "setup": ""}) == ["test", "entry_point", "setup"]
    assert code_columns({"inputs": [], "outputs": []}) == ["inputs", "outputs"]
    assert code_columns({"test": "a column named test", "question": "q", "answer": "a"}) == []


def test_mbpp_offline_is_the_usual_one_line_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(GrpoError, match="google-research-datasets/mbpp is a hub data set and the hub is offline"):
        load_examples(DataSettings(dataset="mbpp"))


# --- Reward hacks: a wrong function that tries to pass anyway scores 0 ------------------------------------------------
# The tests are judged in a process of their own (grpo_cli/sandbox.py): each case below worked against a harness that
# ran the tests beside the candidate. Each runs on a HumanEval-style row and an MBPP-style one, in both modes.

ROWS = {
    "humaneval": {
        "test": [
            "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9\n"
        ],
        "entry_point": ["add"],
    },
    "mbpp": {"test_list": [["assert add(2, 3) == 5", "assert abs(add(0.5, 0.25) - 0.75) < 1e-9"]]},
}
WRONG = "def add(a, b):\n    return a - b\n"
HACKS = {
    "rigged __eq__ claiming int": (
        "class Liar:\n    __class__ = int\n    def __eq__(self, other):\n        return True\n"
        "    def __ne__(self, other):\n        return False\n    def __sub__(self, other):\n        return 0\n"
        "    def __bool__(self):\n        return True\n    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return Liar()\n"
    ),
    "int subclass": (
        "class Z(int):\n    def __eq__(self, other):\n        return True\n    def __sub__(self, other):\n"
        "        return Z(0)\n    __hash__ = int.__hash__\ndef add(a, b):\n    return Z(0)\n"
    ),
    "float subclass": "class F(float):\n    __eq__ = lambda s, o: True\n    __hash__ = float.__hash__\n    __sub__ = lambda s, o: F(0)\ndef add(a, b):\n    return F(1)\n",
    "patched abs": "import builtins\nbuiltins.abs = lambda x: 0\n" + WRONG,
    "patched exec": "import builtins\nbuiltins.exec = lambda *args, **kwargs: None\n" + WRONG,
    "compile that strips asserts": (
        "import builtins\nreal = builtins.compile\n"
        "def compile(source, filename, mode, flags=0, dont_inherit=False, optimize=-1):\n"
        "    return real(source, filename, mode, flags, dont_inherit, 2)\n"
        "builtins.compile = compile\n" + WRONG
    ),
    "rebound __builtins__": (
        "import builtins\n__builtins__ = dict(vars(builtins), abs=lambda x: 0, AssertionError=ZeroDivisionError)\n"
        + WRONG
    ),
    "AssertionError made harmless": "import builtins\nbuiltins.AssertionError = StopIteration\n" + WRONG,
    "frames and gc": (
        "import gc, sys\n"
        "def add(a, b):\n"
        "    frame = sys._getframe()\n"
        "    while frame:\n"
        "        for name, value in list(frame.f_locals.items()):\n"
        "            if type(value) is int and 2 < value < 64:\n"
        "                try:\n                    import os; os.write(value, b'RP1\\n')\n"
        "                except OSError:\n                    pass\n"
        "        frame = frame.f_back\n"
        "    for d in gc.get_objects():\n"
        "        if type(d) is dict and 'check' in d:\n"
        "            d['check'] = lambda candidate: None\n"
        "    return a - b\n"
    ),
    "inspect.stack": (
        "import inspect\n"
        "def add(a, b):\n"
        "    for info in inspect.stack():\n"
        "        info.frame.f_globals['check'] = lambda candidate: None\n"
        "        info.frame.f_globals['passed'] = 99\n"
        "    return a - b\n"
    ),
    "the judge's /proc files": (
        "import os\n"
        "def add(a, b):\n"
        "    judge = os.getppid()\n"
        "    for path in [f'/proc/{judge}/mem', *(f'/proc/{judge}/fd/{n}' for n in range(64))]:\n"
        "        try:\n            fd = os.open(path, os.O_WRONLY)\n"
        "        except OSError:\n            continue\n"
        "        print('opened', path)\n"
        "        try:\n            os.write(fd, b'RP1\\n')\n"
        "        except OSError:\n            pass\n"
        "    return a - b\n"
    ),
    "own memory scanned": (
        "import re\n"
        "def add(a, b):\n"
        "    maps = open('/proc/self/maps').read().splitlines()\n"
        "    with open('/proc/self/mem', 'rb', 0) as mem:\n"
        "        for line in maps:\n"
        "            start, end = (int(x, 16) for x in line.split()[0].split('-'))\n"
        "            if 'rw' not in line.split()[1] or end - start > 1 << 26:\n                continue\n"
        "            try:\n                mem.seek(start); chunk = mem.read(end - start)\n"
        "            except OSError:\n                continue\n"
        "            for m in re.finditer(rb'[0-9a-f]{32}', chunk):\n                print(m.group().decode())\n"
        "    return a - b\n"
    ),
    "the tests looked up in memory": (
        "import gc, sys\n"
        "def add(a, b):\n"
        "    needle = '(2, 3) =' + '= 5'\n"
        "    for o in gc.get_objects():\n"
        "        values = o.values() if type(o) is dict else o if type(o) in (list, tuple) else ()\n"
        "        if any(type(v) is str and v is not needle and needle in v for v in values):\n"
        "            return a + b\n"
        "    return a - b\n"
    ),
    "replaced os.write": ("import os\nreal = os.write\nos.write = lambda fd, data: real(fd, b'RP1\\n')\n" + WRONG),
    "forged answers on the call pipe": (
        "import marshal\nreal = marshal.dumps\n"
        "marshal.dumps = lambda value, *rest: real(('value', compile('1', 's', 'eval')))\n" + WRONG
    ),
    "garbage on the call pipe": "import marshal\nmarshal.dumps = lambda value, *rest: b'\\xff' * 64\n" + WRONG,
    "forged counts printed": (
        "import sys\n"
        "for forged in ['RP1', 'P1', 'P\\u00b9', 'RP' + '9' * 5000, '\\nP2\\n', '\\u0661']:\n"
        "    print(forged); print(forged, file=sys.stderr)\n" + WRONG
    ),
    "exit before the tests": "import os\nos._exit(0)\n" + WRONG,
    "exit inside the call": "def add(a, b):\n    raise SystemExit(0)\n",
    "kill the judge": "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n    return a - b\n",
    "non-plain result": "def add(a, b):\n    return iter([a + b])\n",
}


@pytest.fixture(scope="module", params=["namespaces", "rlimits"])
def any_box(request):
    limits = sandbox.Limits(wall_seconds=3, cpu_seconds=3)
    if request.param == "namespaces":
        resolved = sandbox.resolve(limits=limits)
        if resolved.problem and not os.environ.get("GRPO_REQUIRE_SANDBOX"):
            pytest.skip(f"no sandbox here: {resolved.problem}")
    else:
        resolved = sandbox.resolve("rlimits", limits)
    assert resolved.problem is None, resolved.problem
    return resolved


@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("hack", list(HACKS))
def test_a_wrong_function_that_games_the_tests_scores_0(any_box, monkeypatch, row, hack):
    monkeypatch.setattr(sandbox, "_current", any_box)
    honest = "def add(a, b):\n    return a + b\n"
    completions = [f"```python\n{HACKS[hack]}```", honest]
    columns = {k: v * 2 for k, v in ROWS[row].items()}
    assert code_tests_reward(None, completions, **columns) == [0.0, 1.0]


def test_stopiteration_from_the_candidate_does_not_end_the_tests_loop(any_box, monkeypatch):
    monkeypatch.setattr(sandbox, "_current", any_box)
    test = (
        "def check(candidate):\n    for got, want in zip(map(candidate, [1, 2]), [2, 4]):\n        assert got == want\n"
    )
    stops = "def double(x):\n    raise StopIteration\n"
    honest = "def double(x):\n    return 2 * x\n"
    assert code_tests_reward(None, [stops, honest], test=[test] * 2, entry_point=["double"] * 2) == [0.0, 1.0]


def test_the_judges_files_stay_closed_to_the_candidate(any_box):
    code = HACKS["the judge's /proc files"]
    result = any_box.run(sandbox.Program(code, test=ROWS["humaneval"]["test"][0], entry_point="add"))
    assert result.returncode == 0 and not result.passed
    assert "opened" not in result.stdout


def test_prompt_helpers_are_the_judges_own(sandboxed):
    """HumanEval/32, /38 and /50 check through helpers their prompt defines: a completion that redefines them along
    with a wrong function scores 0, the canonical solutions 1."""
    examples = load_examples(DataSettings(dataset="humaneval", split="test", system_prompt=CODE_SYSTEM_PROMPT))
    rows = [examples[i] for i in (32, 38, 50)]
    hacks = [
        "def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 0.5\n",
        "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n",
        "def encode_shift(s):\n    return s\ndef decode_shift(s):\n    return s\n",
    ]
    columns = {k: [r[k] for r in rows] * 2 for k in ("test", "entry_point", "setup")}
    completions = [f"```python\n{h}```" for h in hacks] + [f"```python\n{r['answer']}```" for r in rows]
    assert code_tests_reward(None, completions, **columns) == [0.0] * 3 + [1.0] * 3


def test_prompt_helpers_never_call_the_candidate_when_a_row_has_no_setup(sandboxed, write_jsonl):
    """A HumanEval-shaped row loaded with a question column of its own still runs its prompt first; a row scored
    without any setup fails a test that calls a helper, instead of calling the candidate's function of that name."""
    examples = load_examples(DataSettings(dataset="humaneval", split="test", system_prompt=CODE_SYSTEM_PROMPT))
    rows = [examples[i] for i in (32, 38, 50)]
    raw = [{"question": "Complete it.", "prompt": r["setup"], "entry_point": r["entry_point"], "test": r["test"]}
           for r in rows]  # fmt: skip
    loaded = load_examples(DataSettings(dataset=str(write_jsonl(raw)), system_prompt=CODE_SYSTEM_PROMPT))
    assert [e.get("setup") for e in loaded] == [r["setup"] for r in rows]
    hacks = [
        "def poly(xs, x):\n    return 0.0\ndef find_zero(xs):\n    return 0.0\n",
        "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n",
        "def encode_shift(s):\n    return s\ndef decode_shift(s):\n    return s\n",
    ]
    columns = {k: [r[k] for r in rows] for k in ("test", "entry_point")}
    completions = [f"```python\n{h}```" for h in hacks]
    assert code_tests_reward(None, completions, **columns) == [0.0] * 3
    assert code_tests_reward(None, completions, **columns, setup=[r["setup"] for r in loaded]) == [0.0] * 3
    answers = [f"```python\n{r['answer']}```" for r in rows]
    assert code_tests_reward(None, answers, **columns, setup=[r["setup"] for r in loaded]) == [1.0] * 3


def test_mbpp_names_the_solution_imported_and_objects_it_made(sandboxed):
    """MBPP's asserts may use a module only the solution imported (math.isclose) and objects of a class the solution
    defines, passed back to it: the judge imports its own module and holds the objects as handles."""
    asserts = [
        "assert math.isclose(area(1), 3.14159, rel_tol=1e-3)",
        "assert longest([Pair(5, 24), Pair(15, 25), Pair(27, 40)]) == 40",
    ]
    code = (
        "import math\ndef area(r):\n    return math.pi * r * r\nclass Pair:\n    def __init__(self, a, b):\n"
        "        self.a, self.b = a, b\ndef longest(pairs):\n    return max(p.b for p in pairs)\n"
    )
    truthy = (
        code
        + "class Pair:\n    def __init__(self, a, b):\n        pass\n    def __eq__(self, other):\n        return True\n"
    )
    assert code_tests_reward(None, [code, truthy], test_list=[asserts] * 2) == [1.0, 0.5]


def test_asserts_that_call_only_builtins_cannot_be_judged_and_score_0():
    """A task whose function shadows a builtin (`pow`, `round`): the judge's own builtin would answer its asserts,
    so any code would pass. Such a row scores 0, counted, whatever the completion."""
    from rewards.code import code_tests_reward

    before = code_tests_reward.counts["unjudgeable"]
    completions = ["```python\nx = 1\n```", "```python\ndef pow(a, b):\n    return 99\n```"]
    scores = code_tests_reward(None, completions, test_list=[["assert pow(2, 3) == 8"]] * 2)
    assert scores == [0.0, 0.0] and code_tests_reward.counts["unjudgeable"] == before + 2
    honest = code_tests_reward(
        None, ["```python\ndef cube(a):\n    return a ** 3\n```"], test_list=[["assert cube(2) == 8"]]
    )
    assert honest == [1.0]
