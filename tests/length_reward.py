"""A user reward for the integration tests: longer completions score higher, so every group has spread."""


def longer(completions, **kwargs):
    return [len(c[-1]["content"]) / 100 for c in completions]
