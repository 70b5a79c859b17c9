"""Correctness by numeric value rather than by string, so "$1,300.00" counts as 1300."""

from functools import lru_cache

from rewards.reference import completion_text, extract_xml_answer


@lru_cache(maxsize=4096)
def _parse(text: str):
    from math_verify import parse

    return parse(text)


def same_number(predicted: str, reference: str) -> bool:
    """True when both strings hold the same number, whatever their notation.

    >>> same_number("$1,300.00", "1300"), same_number("13", "14"), same_number("", "0")
    (True, False, False)
    """
    from math_verify import verify

    gold, guess = _parse(str(reference)), _parse(predicted)
    return bool(gold and guess) and verify(gold, guess)


def numeric_correctness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """2.0 when the completion's ``<answer>`` is numerically equal to the reference.

    >>> numeric_correctness_reward(None, ["<answer>$13.00</answer>", "<answer>12</answer>", "13"], ["13"] * 3)
    [2.0, 0.0, 0.0]
    """
    texts = [completion_text(c) for c in completions]
    return [
        2.0 if "<answer>" in t and same_number(extract_xml_answer(t), str(a)) else 0.0 for t, a in zip(texts, answer)
    ]
