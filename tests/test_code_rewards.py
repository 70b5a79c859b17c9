"""The code rewards and code data: code extraction, HumanEval, MBPP and stdin/stdout rows, the generated function
tasks, and a harness failure as an error. The rewards run in the real sandbox (skipped where there is none)."""

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


@pytest.mark.parametrize("name", ["functions", "two-step-functions"])
def test_function_tasks_are_seeded_disjoint_and_their_references_pass(sandboxed, name):
    two_step = name == "two-step-functions"
    train, test = function_tasks("train", two_step=two_step), function_tasks("test", two_step=two_step)
    assert function_tasks("test", two_step=two_step) == test and len(test) == 100 and len(train) > 200
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
