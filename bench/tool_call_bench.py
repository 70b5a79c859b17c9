"""What a file tool call costs: forked from grpo's tool server against forking the run itself, as the run grows.

    python bench/tool_call_bench.py --gib 0.5 8      # resident GiB the run holds while it calls the tool

A fork copies the forking process's page tables, so forking the trainer costs time in proportion to what it holds;
grpo's tool server is forked when the tools are resolved, before any model loads (grpo_cli/tools.py ForkServer).
Prints the best of 10 calls each way.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_cli import tools  # noqa: E402
from grpo_cli.config import DataSettings  # noqa: E402
from grpo_cli.cpu import best_time  # noqa: E402

TOOL = 'def add(a: int, b: int) -> int:\n    """Add.\n\n    Args:\n        a: One.\n        b: Two.\n    """\n    return a + b\n'


def best(call) -> float:
    """Milliseconds, the best of 10 after one to warm up."""
    return best_time(call, repeats=10) * 1000


def fork_the_run() -> None:
    """The earlier way: fork this process for the call, read its answer, reap it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, b"3")
        os._exit(0)
    os.close(write)
    os.read(read, 8)
    os.close(read)
    os.waitpid(pid, 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, nargs="+", default=[0.5, 4.0])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    (folder / "tool.py").write_text(TOOL)
    (call,) = tools.resolve(DataSettings(tools=[f"{folder}/tool.py:add"])).tools  # the server forks here, small
    held = bytearray()
    for gib in sorted(args.gib):
        held.extend(bytearray(int(gib * 2**30) - len(held)))
        for i in range(0, len(held), 4096):
            held[i] = 1  # resident, not just reserved
        print(
            f"{gib:g} GiB resident in the run: a call through the tool server {best(lambda: call(a=1, b=2)):.1f} ms, "
            f"forking the run {best(fork_the_run):.1f} ms"
        )


if __name__ == "__main__":
    main()
