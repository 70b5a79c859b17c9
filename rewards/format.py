"""Format rewards with partial credit, for models too small to hit the whole format by chance."""

import re

from rewards.reference import completion_text

FINAL_ANSWER = re.compile(r"<answer>\s*-?[\d,]+(?:\.\d+)?\s*</answer>\s*$")


def answer_tag_reward(completions, **kwargs) -> list[float]:
    """0.25 for each answer tag, 0.5 more when the completion ends with ``<answer>NUMBER</answer>``.

    >>> answer_tag_reward(["2 + 3 = 5\\n<answer>5</answer>", "<answer>5", "5", "<answer>5</answer> and more"])
    [1.0, 0.25, 0.0, 0.5]
    """
    scores = []
    for c in completions:
        text = completion_text(c)
        score = 0.25 * ("<answer>" in text) + 0.25 * ("</answer>" in text)
        scores.append(score + (0.5 if FINAL_ANSWER.search(text) else 0.0))
    return scores


NUMBER = re.compile(r"\d+(?:\.\d+)?")


def numbers_used_reward(prompts, completions, **kwargs) -> list[float]:
    """Share of the question's numbers that the completion works with (0..1).

    It keeps a model from answering with a memorised example instead of this question's numbers.

    >>> question = [[{"role": "user", "content": "Ava has 12 pens and gets 5 more."}]]
    >>> numbers_used_reward(question * 3, ["12 + 5 = 17 <answer>17</answer>", "3 + 4 = 7", "12 pens"])
    [1.0, 0.0, 0.5]
    """
    scores = []
    for prompt, completion in zip(prompts, completions):
        question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        wanted = set(NUMBER.findall(question))
        used = set(NUMBER.findall(completion_text(completion)))
        scores.append(len(wanted & used) / len(wanted) if wanted else 0.0)
    return scores


def tool_use_reward(completions, **kwargs) -> list[float]:
    """0.25 when the completion makes a well-formed tool call, 0.25 more when every call came back with a result
    rather than an error (a call the model talks past, so that no room is left for the result, earns the first
    part only); 0 for a completion without calls. It leads a small model to call the tools it is offered, and to
    stop and wait for the result.

    >>> call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}
    >>> answered = [call, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "<answer>42</answer>"}]
    >>> failed = [call, {"role": "tool", "content": "{'error': 'division by zero'}"}]
    >>> tool_use_reward([answered, failed, [call], [{"role": "assistant", "content": "42"}], "42"])
    [0.5, 0.25, 0.25, 0.0, 0.0]
    """
    scores = []
    for c in completions:
        messages = c if isinstance(c, list) else []
        called = any(m.get("tool_calls") for m in messages if m.get("role", "assistant") == "assistant")
        results = [m.get("content") for m in messages if m.get("role") == "tool"]
        failed = any(isinstance(r, str) and r.startswith("{'error': ") for r in results)
        scores.append(0.25 * called + 0.25 * (called and bool(results) and not failed))
    return scores
