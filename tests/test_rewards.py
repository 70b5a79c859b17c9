import pytest

from grpo_cli.errors import GrpoError
from rewards import REWARDS, checked, resolve, split_weight
from rewards.reference import count_xml, extract_xml_answer

# Strings in the shape the reference notebook's rewards were written for.
STRICT = "<reasoning>\nNatalia sold 48/2 = 24 clips in May.\n</reasoning>\n<answer>\n72\n</answer>\n"
ONE_LINE = "<reasoning>48 + 24 = 72</reasoning> <answer>72</answer>"
MULTILINE_SOFT = "<reasoning>\n48 + 24\n</reasoning>\n<answer>72</answer>"
TRAILING = STRICT + "Hope this helps!"
PLAIN = "The answer is 72."


def msg(text):
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    "text, expected",
    [
        (STRICT, 0.5),
        (ONE_LINE, 0.0),
        (PLAIN, 0.0),
        (TRAILING, 0.5 - 2 * 0.001 * len("Hope this helps!")),
        ("<reasoning>\nx\n</reasoning>\n", 0.25),
        # the reference's quirk: without the final newline the whole text counts as trailing
        (STRICT.rstrip("\n"), 0.5 + 0.001 - 0.001 * len(STRICT.rstrip("\n"))),
    ],
)
def test_xmlcount(text, expected):
    assert REWARDS["xmlcount"]([msg(text)]) == [pytest.approx(expected)]
    assert count_xml(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("soft_format", STRICT, 0.0),  # the reference's pattern has no DOTALL: newlines inside fail
        ("soft_format", ONE_LINE, 0.5),
        ("soft_format", MULTILINE_SOFT, 0.0),
        ("soft_format", PLAIN, 0.0),
        ("strict_format", STRICT, 0.5),
        ("strict_format", ONE_LINE, 0.0),
        ("strict_format", TRAILING, 0.0),
        ("strict_format", STRICT.rstrip("\n"), 0.0),
        ("integer", STRICT, 0.5),
        ("integer", "<answer>\n-3\n</answer>", 0.0),
        ("integer", "<answer>7.5</answer>", 0.0),
        ("integer", PLAIN, 0.0),
        ("answer_tag", "2 + 3 = 5\n<answer>5</answer>", 1.0),
        ("answer_tag", "<answer>1,300</answer>\n", 1.0),
        ("answer_tag", "<answer>five</answer>", 0.5),
        ("answer_tag", PLAIN, 0.0),
    ],
)
def test_format_rewards(name, text, expected):
    assert REWARDS[name](completions=[msg(text)]) == [expected]


@pytest.mark.parametrize(
    "text, answer, exact, numeric",
    [
        (STRICT, "72", 2.0, 2.0),
        (ONE_LINE, "72", 2.0, 2.0),
        ("<answer>72.00</answer>", "72", 0.0, 2.0),
        ("<answer>$13</answer>", "13", 0.0, 2.0),
        ("<answer>1,300</answer>", "1300", 0.0, 2.0),
        ("<answer>13</answer>", "14", 0.0, 0.0),
        ("<answer></answer>", "0", 0.0, 0.0),
        (PLAIN, "72", 0.0, 0.0),  # no tag, no credit
        ("72", "72", 2.0, 0.0),  # the reference compares the whole text when there is no tag
    ],
)
def test_correctness(text, answer, exact, numeric):
    assert REWARDS["correctness"](prompts=[None], completions=[msg(text)], answer=[answer]) == [exact]
    assert REWARDS["numeric_correctness"](prompts=[None], completions=[msg(text)], answer=[answer]) == [numeric]


@pytest.mark.parametrize(
    "question, text, expected",
    [
        ("Ava has 12 pens and gets 5 more.", "12 + 5 = 17 <answer>17</answer>", 1.0),
        ("Ava has 12 pens and gets 5 more.", "3 + 4 = 7 <answer>7</answer>", 0.0),  # the memorised example
        ("Ava has 12 pens and gets 5 more.", "12 pens", 0.5),
        ("No numbers here.", "42", 0.0),
    ],
)
def test_numbers_used(question, text, expected):
    prompt = [{"role": "user", "content": question}]
    assert REWARDS["numbers_used"](prompts=[prompt], completions=[msg(text)]) == [expected]


def test_extract_xml_answer_takes_the_last_answer():
    assert extract_xml_answer("<answer>1</answer> then <answer>\n2\n</answer>") == "2"


@pytest.mark.parametrize(
    "spec, expected",
    [("correctness", ("correctness", 1.0)), ("correctness:2", ("correctness", 2.0)),
     ("pkg.mod:fn", ("pkg.mod:fn", 1.0)), ("r.py:fn:0.5", ("r.py:fn", 0.5))],
)  # fmt: skip
def test_split_weight(spec, expected):
    assert split_weight(spec) == expected


def test_resolve_user_reward_from_file(tmp_path):
    (tmp_path / "mine.py").write_text("def brevity(completions, **kw):\n    return [-len(c) for c in completions]\n")
    func, weight = resolve(f"{tmp_path}/mine.py:brevity:0.1")
    assert func(completions=["ab", "a"]) == [-2, -1] and weight == 0.1


def test_resolve_user_reward_from_module():
    func, _ = resolve("rewards.reference:int_reward")
    assert func is REWARDS["integer"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("corectness", "unknown reward 'corectness': did you mean correctness?"),
        ("nope", "choose from xmlcount, soft_format"),
        ("no_such_module_xyz:f", "reward module no_such_module_xyz does not import"),
        ("rewards.reference:STRICT_FORMAT", "is not a callable"),
        ("missing.py:f", "reward file missing.py does not exist"),
    ],
)
def test_resolve_errors(spec, message):
    with pytest.raises(GrpoError, match=message.replace("?", r"\?")):
        resolve(spec)


def test_checked_names_the_reward_and_the_example():
    def fragile(completions, **kw):
        return [1.0 / len(c) for c in completions]

    with pytest.raises(GrpoError, match=r"reward fragile raised ZeroDivisionError.*on ''"):
        checked(fragile)(prompts=["p", "p"], completions=["ok", ""])


def test_checked_catches_a_wrong_count():
    with pytest.raises(GrpoError, match="returned 1 values for 2 completions"):
        checked(lambda prompts, completions, **kw: [1.0])(prompts=["p", "p"], completions=["a", "b"])
