"""A user tool and a user environment for the integration tests, as a user would write them."""


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


class Tally:
    """Counts what the model adds to it; the reward is the final count's closeness to the row's answer."""

    def reset(self, **row):
        self.count, self.answer = 0, row.get("answer")

    def bump(self, by: int) -> str:
        """Add to the tally and return the new count.

        Args:
            by: How much to add.
        """
        self.count += by
        return str(self.count)

    def get_reward(self) -> float:
        return 1.0 if str(self.count) == str(self.answer) else 0.0
