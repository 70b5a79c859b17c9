"""The five rewards of the reference GSM8K recipe, with its exact semantics and values.

Every reward takes TRL's arguments (``prompts``, ``completions``, dataset columns such as
``answer``) and returns one float per completion.
"""

import re

STRICT_FORMAT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$")
SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>")


def completion_text(completion) -> str:
    """The text of one completion, plain or conversational (a list of messages). A tool conversation (assistant
    turns with calls, tool results, the answer) is scored on its final assistant message.

    >>> completion_text([{"role": "assistant", "content": "hi"}])
    'hi'
    >>> completion_text([{"role": "assistant", "content": "", "tool_calls": []},
    ...                  {"role": "tool", "name": "calculator", "content": "12"},
    ...                  {"role": "assistant", "content": "<answer>12</answer>"}])
    '<answer>12</answer>'
    """
    if isinstance(completion, str):
        return completion
    said = [m for m in completion if m.get("role", "assistant") == "assistant"]
    return (said[-1].get("content") or "") if said else ""


def extract_xml_answer(text: str) -> str:
    """What stands between the last ``<answer>`` and the next ``</answer>``.

    >>> extract_xml_answer("<reasoning>\\n2+2\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n")
    '4'
    """
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def count_xml(text: str) -> float:
    """0.125 per well-placed tag, less 0.001 per character after the closing answer tag.

    >>> count_xml("<reasoning>\\nx\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n")
    0.5
    """
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def xmlcount_reward(completions, **kwargs) -> list[float]:
    """Partial credit for each XML tag, the reference's ``xmlcount_reward_func``.

    >>> xmlcount_reward([[{"content": "<reasoning>\\nx\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n"}]])
    [0.5]
    """
    return [count_xml(completion_text(c)) for c in completions]


def soft_format_reward(completions, **kwargs) -> list[float]:
    """0.5 when the completion starts with reasoning then answer tags (single-line contents).

    >>> soft_format_reward(["<reasoning>x</reasoning> <answer>4</answer>", "4"])
    [0.5, 0.0]
    """
    return [0.5 if SOFT_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def strict_format_reward(completions, **kwargs) -> list[float]:
    """0.5 for exactly the line layout of the reference format.

    >>> strict_format_reward(["<reasoning>\\nx\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n"])
    [0.5]
    """
    return [0.5 if STRICT_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def int_reward(completions, **kwargs) -> list[float]:
    """0.5 when the extracted answer is made of digits only.

    >>> int_reward(["<answer>42</answer>", "<answer>4.2</answer>"])
    [0.5, 0.0]
    """
    return [0.5 if extract_xml_answer(completion_text(c)).isdigit() else 0.0 for c in completions]


def correctness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """2.0 when the extracted answer equals the reference answer exactly.

    >>> correctness_reward(None, ["<answer>72</answer>", "<answer>72.0</answer>"], ["72", "72"])
    [2.0, 0.0]
    """
    return [2.0 if extract_xml_answer(completion_text(c)) == str(a) else 0.0 for c, a in zip(completions, answer)]
