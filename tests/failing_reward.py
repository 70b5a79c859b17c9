"""A reward that raises on its third call, which is the third training step with one generation batch a step."""

calls = 0


def fails_on_third_call(prompts, completions, **kwargs):
    global calls
    calls += 1
    if calls == 3:
        raise ValueError("the third call fails")
    return [float(len(c[-1]["content"]) % 5) for c in completions]  # spread within each group
