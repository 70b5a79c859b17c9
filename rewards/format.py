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
