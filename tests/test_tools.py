"""Tools and environments: checked before any model loads, run so that none ends a run, carried by chat templates
TRL parses, and the tool loop that infer, eval and the dry run share with training."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo_cli import tools
from grpo_cli.config import DataSettings
from grpo_cli.errors import GrpoError
from grpo_cli.generate import Sampling, converse, run_tool_calls, transcript

# --- the built-in calculator ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, value",
    [("123 * 456", "56088"), ("(17 + 25) * 3 - 4", "122"), ("10 / 4", "2.5"), ("9 / 3", "3"), ("2 ** 10", "1024"),
     ("-7 // 2", "-4"), ("17 % 5", "2"), ("1,234 + 1", "1235"), ("3 × 4", "12"), ("2^8", "256"), ("0.1 + 0.2", "0.3")],
)  # fmt: skip
def test_calculator_evaluates_arithmetic_exactly(expression, value):
    assert tools.calculator(expression) == value


@pytest.mark.parametrize(
    "expression, message",
    [("__import__('os').system('true')", "only numbers"), ("abs(-1)", "only numbers"), ("x + 1", "only numbers"),
     ("'a' * 3", "only numbers"), ("1 / 0", "division by zero"), ("9 ** 9 ** 9", "power is too large"),
     ("10 ** 40 * 10 ** 40", "too large"), ("2 +", "is not an arithmetic expression")],
)  # fmt: skip
def test_calculator_refuses_anything_but_arithmetic(expression, message):
    with pytest.raises(ValueError, match=message):
        tools.calculator(expression)


# --- loading and checking -------------------------------------------------------------------------------------------

GOOD = '''
def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b
'''


@pytest.mark.parametrize(
    "source, spec, message",
    [
        ("def f(a: int):\n    return a\n", "f", r"tool .*:f: .*Google-style docstring"),
        ('def f(a):\n    """Do.\n\n    Args:\n        a: A.\n    """\n', "f", r"tool .*:f: .*type hint"),
        ('def f(a: int):\n    """Do."""\n', "f", r"tool .*:f: .*a line per argument under Args"),
        ("class F:\n    pass\n", "F", r"is a class: give a function, or pass the class as --environment"),
        ("f = 3\n", "f", r"is not a callable"),
        (GOOD, "adds", r"has no 'adds': did you mean add\?"),
        (
            "import nothing_here\n",
            "f",
            r"failed to import \(ModuleNotFoundError: No module named 'nothing_here'\): fix it",
        ),
    ],
)
def test_a_bad_tool_is_one_line(tmp_path, source, spec, message):
    (tmp_path / "t.py").write_text(source)
    with pytest.raises(GrpoError, match=message) as caught:
        tools.load_tool(f"{tmp_path / 't.py'}:{spec}")
    assert "\n" not in str(caught.value)


def test_tool_names_that_are_not_there_are_one_line(tmp_path):
    with pytest.raises(GrpoError, match=r"not a built-in tool \(calculator, python\)"):
        tools.load_tool("calculater")
    with pytest.raises(GrpoError, match="does not exist"):
        tools.load_tool(f"{tmp_path}/missing.py:f")
    with pytest.raises(GrpoError, match="two tools are named 'add'"):
        (tmp_path / "t.py").write_text(GOOD)
        tools.resolve(DataSettings(tools=[f"{tmp_path}/t.py:add", f"{tmp_path}/t.py:add"]))


ENVIRONMENTS = '''
class Counter:
    def reset(self, **row):
        self.total = int(row.get("start", 0))
        return f" (the counter starts at {self.total})"

    def increment(self, step: int) -> str:
        """Add to the counter.

        Args:
            step: How much to add.
        """
        self.total += step
        return str(self.total)

    def hang(self) -> str:
        """Never return."""
        while True:
            pass

    def leave(self) -> str:
        """Call exit."""
        raise SystemExit(3)

    def get_reward(self, **kwargs) -> float:
        return float(self.total)


class NoReset:
    def go(self) -> str:
        """Go."""


class Undescribed:
    def reset(self, **row):
        pass

    def go(self, where):
        return where
'''


@pytest.fixture
def environments(tmp_path):
    (tmp_path / "envs.py").write_text(ENVIRONMENTS + GOOD)
    return tmp_path / "envs.py"


def test_an_environment_must_reset_and_describe_its_methods(environments):
    with pytest.raises(GrpoError, match=r"NoReset has no reset\(\): add `def reset\(self, \*\*row\)`"):
        tools.load_environment(f"{environments}:NoReset")
    with pytest.raises(GrpoError, match=r"Undescribed, method go: .*type hint"):
        tools.load_environment(f"{environments}:Undescribed")
    with pytest.raises(GrpoError, match=r"environment .*:add is not a class"):
        tools.load_environment(f"{environments}:add")


def test_a_bad_tool_stops_train_in_one_line_before_anything_is_written(tmp_path):
    (tmp_path / "t.py").write_text("def f(a: int):\n    return a\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNSLOTH_")}  # other tests' settings stay there
    result = subprocess.run(
        [sys.executable, "-m", "grpo_cli", "train", "--tool", f"{tmp_path}/t.py:f", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Google-style docstring" in result.stderr
    assert not out.exists()


# --- running: no tool ends a run ------------------------------------------------------------------------------------

FLAKY = '''
import os, time


def boom(x: int) -> str:
    """Raise.

    Args:
        x: Anything.
    """
    raise KeyError(x)


def sleepy(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "awake"


def quits(status: int) -> str:
    """Leave the process.

    Args:
        status: The exit status.
    """
    os._exit(status)


def crashes() -> str:
    """Kill the process."""
    os.kill(os.getpid(), 9)


def chatty(word: str) -> list:
    """Print, then answer in content parts.

    Args:
        word: What to say.
    """
    print("noise on stdout")
    return [{"type": "text", "text": word}]
'''


@pytest.fixture
def flaky(tmp_path):
    (tmp_path / "flaky.py").write_text(FLAKY + GOOD)
    specs = [f"{tmp_path}/flaky.py:{name}" for name in ("boom", "sleepy", "quits", "crashes", "chatty", "add")]
    return tools.resolve(DataSettings(tools=specs, tool_timeout=1.0))


def test_a_tool_that_raises_hangs_exits_or_crashes_is_an_error_the_model_reads(flaky, capfd):
    called = {t.__name__: t for t in flaky.tools}
    assert called["add"](a=2, b=3) == "5"
    with pytest.raises(RuntimeError, match="KeyError: 7"):
        called["boom"](x=7)
    start = time.monotonic()
    with pytest.raises(tools.ToolTimeout, match="ran past 1s and was stopped"):
        called["sleepy"](seconds=60)
    assert time.monotonic() - start < 5
    with pytest.raises(RuntimeError, match="exited with status 3 before returning"):
        called["quits"](status=3)
    with pytest.raises(RuntimeError, match="was killed by signal 9"):
        called["crashes"]()
    assert called["chatty"](word="hi") == [{"type": "text", "text": "hi"}]
    assert "noise" not in capfd.readouterr().out  # the tool's printing never reaches the progress display


def test_failures_are_counted_and_the_turn_goes_on(flaky):
    named = {t.__name__: t for t in flaky.tools}
    calls = [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
        {"type": "function", "function": {"name": "boom", "arguments": {"x": 1}}},
        {"type": "function", "function": {"name": "nowhere", "arguments": {}}},
        {"type": "function", "function": {"name": "sleepy", "arguments": {"seconds": 30}}},
    ]
    messages, failures = run_tool_calls(calls, named)
    assert failures == 3
    assert [m["content"] for m in messages] == [
        "3", "{'error': 'KeyError: 1'}", "{'error': 'Tool nowhere not found.'}",
        "{'error': 'the tool ran past 1s and was stopped'}",
    ]  # fmt: skip


def test_the_wrapped_tools_describe_themselves_as_the_users_own(flaky, environments):
    from transformers.utils import get_json_schema

    assert get_json_schema(flaky.tools[-1])["function"]["name"] == "add"
    assert get_json_schema(flaky.tools[-1]) == get_json_schema(tools.load_tool(flaky.names[-1]))
    cls = tools.load_environment(f"{environments}:Counter")
    guarded = tools.guarded_environment(cls, 1.0)
    assert guarded.__name__ == "Counter"
    assert get_json_schema(guarded.increment) == get_json_schema(cls.increment)


def test_an_environment_keeps_its_state_and_its_hangs_are_stopped(environments):
    toolset = tools.resolve(DataSettings(environment=f"{environments}:Counter", tool_timeout=1.0))
    assert toolset.environment_factory.__name__ == "Counter"
    named, environment, observation = toolset.for_row({"start": 5})
    assert observation == " (the counter starts at 5)" and set(named) == {"increment", "hang", "leave"}
    assert named["increment"](step=2) == "7" and named["increment"](step=3) == "10"
    assert environment.get_reward() == 10.0
    with pytest.raises(tools.ToolTimeout):
        named["hang"]()
    with pytest.raises(RuntimeError, match=r"called exit\(3\)"):
        named["leave"]()
    assert named["increment"](step=1) == "11"  # still there after both


def test_the_data_column_picks_the_environment(environments):
    data = DataSettings(environment={"count": f"{environments}:Counter"})
    toolset = tools.resolve(data)
    assert toolset.environment_factory.keys() == {"count"}
    named, _, _ = toolset.for_row({"environment": "count", "start": 1})
    assert named["increment"](step=1) == "2"
    with pytest.raises(GrpoError, match=r"a row names environment 'other'"):
        toolset.for_row({"environment": "other"})


def test_recipe_keys_are_checked():
    from grpo_cli.config import Settings, validate

    for bad, message in [
        ({"max_tool_calling_iterations": 0}, "max_tool_calling_iterations must be a positive integer, got 0"),
        ({"tool_timeout": -1.0}, "tool_timeout must be a positive number of seconds"),
        ({"environment": {"math": 3}}, "give each name a file.py:Class"),
    ]:
        with pytest.raises(GrpoError, match=message):
            validate(Settings(data=DataSettings(tools=["calculator"], **bad)))


# --- chat templates that carry tools -------------------------------------------------------------------------------

LLAMA_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]
CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "6*7"}}}


def embedded_tokenizer():
    from transformers import AutoTokenizer

    from grpo_cli.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def parsed_back(tokenizer, rollout):
    """Render a tool call with the template, then parse the rendered text back as TRL does."""
    from trl.chat_template_utils import parse_response

    prompt = [{"role": "user", "content": "What is 6*7?"}]
    before = tokenizer.apply_chat_template(
        prompt, tools=[tools.calculator], add_generation_prompt=True, tokenize=False, chat_template=rollout
    )
    after = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": "", "tool_calls": [CALL]}],
        tools=[tools.calculator],
        tokenize=False,
        chat_template=rollout,
    )
    assert after.startswith(before)
    ids = tokenizer(after[len(before) :], add_special_tokens=False)["input_ids"]
    return parse_response(tokenizer, ids, prefix=tokenizer(before, add_special_tokens=False)["input_ids"])


def test_the_embedded_model_carries_tools_with_qwens_template_over_its_chatml():
    tokenizer = embedded_tokenizer()
    line, rollout = tools.carry_tools(tokenizer, "smollm2-135m")
    assert line == (
        "Tools: chat template qwen2_5.jinja over smollm2-135m's ChatML tokens; "
        "calls parsed by TRL's response template (<tool_call> JSON)"
    )
    assert rollout is None and "<tool_call>" in tokenizer.chat_template
    assert parsed_back(tokenizer, rollout)["tool_calls"] == [CALL]


@pytest.mark.parametrize(
    "template, said",
    [("llama3_1.jinja", "chat template llama3_1.jinja;"), ("llama3_2.jinja", "chat template llama3_2.jinja;"),
     ("qwen2_5.jinja", "chat template qwen2_5.jinja;"),
     ("qwen3.jinja", "qwen3.jinja (rollouts rendered with TRL's prefix-preserving qwen3_training.jinja)")],
)  # fmt: skip
def test_llama_and_qwen_templates_carry_tools_that_trl_parses_back(template, said):
    tokenizer = embedded_tokenizer()
    if template.startswith("llama"):
        tokenizer.add_special_tokens({"additional_special_tokens": LLAMA_TOKENS})
    tokenizer.chat_template = tools._trl_template(template)
    line, rollout = tools.carry_tools(tokenizer, template)
    assert said in line
    assert parsed_back(tokenizer, rollout)["tool_calls"] == [CALL]


def test_a_template_without_tools_is_refused_in_one_line():
    tokenizer = embedded_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA_TOKENS})
    tokenizer.chat_template = own = tools._trl_template("llama3.jinja")  # Llama 3's drops tool calls
    with pytest.raises(GrpoError, match="cannot carry tool calls that TRL can parse") as caught:
        tools.carry_tools(tokenizer, "llama-3-8b")
    assert "\n" not in str(caught.value) and tokenizer.chat_template == own


# --- the loop infer, eval and the dry run share with training -------------------------------------------------------


def scripted(*turns):
    """An engine's generate that answers each round with the next scripted text for every row."""
    rounds = iter(turns)
    seen = []

    def generate(texts, sampling):
        seen.append(texts)
        turn = next(rounds)
        return [turn] * len(texts)

    generate.seen = seen
    return generate


def call_text(name, **arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.fixture(scope="module")
def chatml():
    tokenizer = embedded_tokenizer()
    tools.carry_tools(tokenizer, "smollm2-135m")
    return tokenizer


PROMPT = [[{"role": "system", "content": "Use the calculator."}, {"role": "user", "content": "What is 6*7?"}]]


def test_converse_calls_the_tool_then_answers(chatml):
    toolset = tools.resolve(DataSettings(tools=["calculator"]))
    generate = scripted(call_text("calculator", expression="6*7"), "<answer>42</answer>")
    (conversation,) = converse(generate, chatml, PROMPT, Sampling(max_tokens=200), toolset)
    assert (conversation.calls, conversation.failures, conversation.text) == (1, 0, "<answer>42</answer>")
    assert [m["role"] for m in conversation.messages] == ["assistant", "tool", "assistant"]
    assert transcript(conversation) == "-> calculator(expression='6*7')\n<- 42\n<answer>42</answer>"
    second = generate.seen[1][0]  # the tool's result goes back in the template's own words, with the schema
    assert second.endswith("<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert '"name": "calculator"' in second and second.startswith(generate.seen[0][0])


def test_converse_stops_at_max_iterations_and_counts_failures(chatml):
    toolset = tools.resolve(DataSettings(tools=["calculator"], max_tool_calling_iterations=2))
    generate = scripted(call_text("calculator", expression="1/0"), call_text("abacus", x=1), call_text("calculator"))
    (conversation,) = converse(generate, chatml, PROMPT, Sampling(max_tokens=400), toolset)
    assert len(generate.seen) == 3  # two rounds of calls run, the third round's call is left as said
    assert (conversation.calls, conversation.failures) == (2, 2)
    results = [m["content"] for m in conversation.messages if m["role"] == "tool"]
    assert results == ["{'error': 'division by zero'}", "{'error': 'Tool abacus not found.'}"]


def test_converse_takes_back_a_round_that_passes_the_token_budget(chatml):
    def long_tool(n: int) -> str:
        """Return many words.

        Args:
            n: How many.
        """
        return "word " * n

    toolset = tools.Toolset(["long_tool"], [long_tool], None, 3, None)
    generate = scripted(call_text("long_tool", n=500), "never asked")
    (conversation,) = converse(generate, chatml, PROMPT, Sampling(max_tokens=100), toolset)
    assert len(generate.seen) == 1 and conversation.calls == 1
    assert [m["role"] for m in conversation.messages] == ["assistant"]  # the result was taken back, as TRL does


def test_converse_with_an_environment_resets_it_per_row_and_keeps_it(chatml, environments):
    toolset = tools.resolve(DataSettings(environment=f"{environments}:Counter"))
    generate = scripted(call_text("increment", step=4), "done")
    rows = [{"start": 1}, {"start": 10}]
    conversations = converse(generate, chatml, PROMPT * 2, Sampling(max_tokens=200), toolset, rows)
    assert [c.environment.get_reward() for c in conversations] == [5.0, 14.0]
    assert "(the counter starts at 10)" in generate.seen[0][1]
    assert '"name": "increment"' in generate.seen[0][0]


def test_rewards_read_the_final_answer_of_a_tool_conversation(chatml):
    from rewards import REWARDS

    toolset = tools.resolve(DataSettings(tools=["calculator"]))
    generate = scripted(call_text("calculator", expression="6*7"), "<answer>42</answer>")
    (conversation,) = converse(generate, chatml, PROMPT, Sampling(max_tokens=200), toolset)
    scores = REWARDS["numeric_correctness"](prompts=PROMPT, completions=[conversation.messages], answer=["42"])
    assert scores == [2.0]


def test_without_tools_the_loop_is_one_plain_generation(chatml):
    generate = scripted("<answer>42</answer>")
    (conversation,) = converse(generate, chatml, PROMPT, Sampling())
    assert conversation.text == "<answer>42</answer>" and conversation.calls == 0
    assert "<tools>" not in generate.seen[0][0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="tools run in a forked child")
def test_the_builtin_python_tool_runs_in_the_sandbox():
    from grpo_cli import sandbox

    if sandbox.current().problem:
        pytest.skip(f"no sandbox here: {sandbox.current().problem}")
    assert tools.python("print(6 * 7)") == "42"
    assert "ZeroDivisionError" in tools.python("1 / 0")
    with pytest.raises(TimeoutError, match="ran past"):
        tools.python("while True:\n    pass")
    mark = Path.cwd() / "written-by-the-model"
    tools.python(f"open({str(mark)!r}, 'w').write('x')")
    assert not mark.exists()  # the project folder is not the program's to write


def test_question_template_wraps_each_question_and_must_name_it(write_jsonl):
    from grpo_cli.config import Settings, validate
    from grpo_cli.data import load_examples

    data = DataSettings(
        dataset=str(write_jsonl([{"question": "2+2?", "answer": "4"}])), question_template="Q: {question}\nA:"
    )
    (example,) = load_examples(data)
    assert example["prompt"][-1] == {"role": "user", "content": "Q: 2+2?\nA:"}
    with pytest.raises(GrpoError, match=r"question_template has no \{question\}"):
        validate(Settings(data=DataSettings(question_template="Q:")))


def test_the_builtin_tools_show_the_model_their_arguments_and_nothing_else():
    from transformers.utils import get_json_schema

    for tool in tools.BUILTIN.values():
        schema = get_json_schema(tool)["function"]
        assert ">>>" not in json.dumps(schema) and schema["parameters"]["required"]


@pytest.mark.slow
def test_a_user_tool_and_environment_train_evaluate_and_infer_on_cpu(tmp_path):
    """The commands for real on the embedded model: two steps with a user tool and a user environment, then eval and
    infer offering the same tools from the adapter's grpo.json."""

    from tests.test_integration import grpo

    out = tmp_path / "out"
    stdout = grpo(
        "train", "--config", "recipes/smollm2-135m-tools-cpu.yaml", "--tool", "tests/tool_examples.py:add",
        "--environment", "tests/tool_examples.py:Tally", "--max-steps", "2", "--num-generations", "4",
        "--batch-size", "4", "--limit", "8", "--eval-steps", "2", "--eval-limit", "4", "--max-completion-length", "48",
        "--report-to", "none", "--output-dir", str(out),
    ).stdout  # fmt: skip
    assert "Tools: chat template qwen2_5.jinja over smollm2-135m's ChatML tokens" in stdout
    assert re.search(r"step 2/2 \| reward .*\| Tally [\d.]+ .*\| tools [\d.]+/completion, \d+% failed", stdout), stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"tools/call_frequency", "tools/failure_frequency"} <= set(rows[-1])
    manifest = json.loads((out / "grpo.json").read_text())
    assert manifest["tools"]["tools"] == ["tests/tool_examples.py:add", "tests/tool_examples.py:Tally"]  # flags win
    assert "## Tools" in (out / "adapter" / "README.md").read_text()

    grpo("eval", "--lora", str(out / "adapter"), "--limit", "4", "--output-dir", str(tmp_path / "eval"))
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())["summary"]
    assert {"tool_calls_per_completion", "tool_use_rate", "tool_failure_rate"} <= set(summary["adapter"])
    answers = json.loads(grpo("infer", "--lora", str(out / "adapter"), "--prompt", "What is 38 * 417?", "--json",
                              "--max-tokens", "48").stdout)  # fmt: skip
    assert set(answers[0]) == {"prompt", "base", "adapter"}


def test_async_tools_and_name_clashes_are_refused(tmp_path, environments):
    (tmp_path / "a.py").write_text(
        'async def fetch(url: str) -> str:\n    """Fetch.\n\n    Args:\n        url: Where.\n    """\n'
    )
    with pytest.raises(GrpoError, match="is async: give a plain function"):
        tools.load_tool(f"{tmp_path}/a.py:fetch")
    (tmp_path / "b.py").write_text(GOOD.replace("def add(", "def increment(").replace("a: int, b: int", "step: int")
                                   .replace("        a: The first number.\n        b: The second number.\n",
                                            "        step: How much.\n").replace("a + b", "step"))  # fmt: skip
    with pytest.raises(GrpoError, match="'increment' is also a method of environment Counter"):
        tools.resolve(DataSettings(tools=[f"{tmp_path}/b.py:increment"], environment=f"{environments}:Counter"))


def test_a_static_method_of_an_environment_is_a_tool_as_in_trl(tmp_path):
    (tmp_path / "s.py").write_text(
        "class Maths:\n    def reset(self, **row):\n        pass\n\n    @staticmethod\n"
        '    def double(x: int) -> int:\n        """Double.\n\n        Args:\n            x: A number.\n        """\n'
        "        return 2 * x\n"
    )
    toolset = tools.resolve(DataSettings(environment=f"{tmp_path}/s.py:Maths"))
    named, _, _ = toolset.for_row({"prompt": []})
    assert named["double"](x=4) == 8


def test_a_tool_call_works_past_descriptor_1024_and_leaves_no_child(flaky):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the descriptor limit here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        named = {t.__name__: t for t in flaky.tools}
        assert named["add"](a=1, b=1) == "2"
        with pytest.raises(tools.ToolTimeout):
            named["sleepy"](seconds=30)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not zombies()  # every child was reaped


def zombies() -> list[int]:
    """This process's children that exited and were never reaped."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


def test_rows_keep_their_columns_for_reset_and_name_known_environments(write_jsonl, environments):
    from grpo_cli.data import load_examples

    rows = [{"question": "q", "answer": "1", "environment": "count", "start": 3}]
    data = DataSettings(dataset=str(write_jsonl(rows)), environment={"count": f"{environments}:Counter"})
    (example,) = load_examples(data)
    assert example["start"] == 3 and example["environment"] == "count"
    named, _, observation = tools.resolve(data).for_row(example)
    assert observation == " (the counter starts at 3)" and named["increment"](step=1) == "4"
    with pytest.raises(GrpoError, match="names environment 'shop', which the recipe does not map"):
        load_examples(DataSettings(dataset=str(write_jsonl([{**rows[0], "environment": "shop"}], "b.jsonl")),
                                   environment=data.environment))  # fmt: skip
    with pytest.raises(GrpoError, match="rows without an 'environment' column"):
        load_examples(DataSettings(dataset=str(write_jsonl([ROW_WITHOUT], "c.jsonl")), environment=data.environment))


ROW_WITHOUT = {"question": "q", "answer": "1"}


def test_a_reset_that_fails_on_a_row_is_one_line(tmp_path):
    (tmp_path / "r.py").write_text(
        "class Needs:\n    def reset(self, target):\n        self.target = target\n\n"
        '    def go(self) -> str:\n        """Go."""\n        return "went"\n'
    )
    toolset = tools.resolve(DataSettings(environment=f"{tmp_path}/r.py:Needs"))
    with pytest.raises(GrpoError, match=r"Needs's reset failed on a row with \['answer', 'prompt'\] \(TypeError"):
        toolset.for_row({"prompt": [], "answer": "1"})


def test_a_tokenizer_that_ships_its_response_parser_keeps_it():
    tokenizer = embedded_tokenizer()
    tokenizer.chat_template = tools._trl_template("qwen2_5.jinja").replace("# Tools", "# Functions")
    tokenizer.response_template = tools._trl_template  # any parser the model ships: TRL leaves it as it is
    line, _ = tools.carry_tools(tokenizer, "my-model")
    assert "my-model's own, with the response parser it ships" in line
    assert tokenizer.response_template is tools._trl_template


def test_tools_offered_to_an_adapter_keep_its_rounds_and_time_limit(tmp_path):
    from grpo_cli.cli import offered_tools
    from tests.fakes import adapter_dir

    adapter = adapter_dir(tmp_path / "adapter")
    manifest = json.loads((adapter / "grpo.json").read_text())
    manifest["settings"]["data"] = {"tools": ["calculator"], "max_tool_calling_iterations": 1, "tool_timeout": 2.5}
    (adapter / "grpo.json").write_text(json.dumps(manifest))
    toolset = offered_tools(["python"], adapter)
    assert (toolset.names, toolset.max_iterations, toolset.timeout) == (["python"], 1, 2.5)
    assert offered_tools(None, adapter) is None  # the adapter's own, read when it loads
    assert offered_tools(["calculator"], None).max_iterations == 3


def test_the_readme_tool_example_sizes_its_prompts_before_loading(tmp_path, capsys):
    """`grpo train --tool calculator` with nothing else: the tools' schemas make every prompt longer than the
    embedded model's 192 tokens. No prompt length was chosen, so it fits the longest prompt (the context follows),
    said in one line; a length the user chose that no prompt fits is refused before any model loads."""
    from grpo_cli.config import load_settings
    from grpo_cli.plan import Machine, resolve
    from grpo_cli.train import check_input

    settings = load_settings(None, {"tools": ["calculator"], "output_dir": str(tmp_path / "a")}, announce=False)
    check_input(settings, resolve(settings, Machine()), False, False, False)
    prompt, context = settings.data.max_prompt_length, settings.model.max_seq_length
    assert prompt > 192 and context >= prompt + settings.train.max_completion_length
    assert f"max_prompt_length {prompt}: the longest prompt with the tools' schemas" in capsys.readouterr().out

    chosen = load_settings(None, {"tools": ["calculator"], "max_prompt_length": 192,
                                  "output_dir": str(tmp_path / "b")}, announce=False)  # fmt: skip
    with pytest.raises(GrpoError, match="longer than max_prompt_length 192 with the tools' schemas"):
        check_input(chosen, resolve(chosen, Machine()), False, False, False)


def test_a_tool_call_is_forked_from_the_small_server_not_from_the_run(tmp_path):
    """Each call's child comes from the fork server made when the tools were resolved, before any model loaded:
    not from the run itself, whose page tables (and threads' locks) a fork would copy at every call."""
    (tmp_path / "who.py").write_text(
        "import os\n\n\ndef parent() -> str:\n"
        '    """Who forked this call.\n\n    Returns:\n        The parent process id.\n    """\n'
        "    return str(os.getppid())\n"
    )
    toolset = tools.resolve(DataSettings(tools=[f"{tmp_path}/who.py:parent"]))
    (call,) = toolset.tools
    assert call.__name__ == "parent"
    forked_from = int(call())
    assert forked_from != os.getpid() and Path(f"/proc/{forked_from}").is_dir()
    assert int(call()) == forked_from  # the same server for every call
