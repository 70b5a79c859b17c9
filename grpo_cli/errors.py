class GrpoError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits 2."""

    everywhere = False  # raised alike on every process of a launch (grpo_cli.dist.agree): printed once a machine
