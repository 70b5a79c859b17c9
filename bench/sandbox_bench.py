"""The code sandbox's cost: start-up of one sandbox, and the time to score a batch of completions.

    python bench/sandbox_bench.py              # median of 30 start-ups, then 64 HumanEval completions
    python bench/sandbox_bench.py --runs 100 --completions 164 --step-seconds 7

Start-up is split into its parts, each the median of --runs: bwrap alone (namespaces and mounts, running
/usr/bin/true), the sandbox's Python alone (-I -S, no sandbox), and one whole sandboxed run of an empty program
(both, plus the judge's hardening: keyring, filter, limits; its pipes and the wait), a judged run of a one-line
HumanEval-style test (the judge forks the candidate and calls it once), with the rlimits-only mode beside them. The
batch is HumanEval's canonical solutions (each passes, so each runs its full test) scored with code_tests, one at a
time and then as many at a time as the sandbox runs, and set against a CPU demo step (--step-seconds: 16 s for
recipes/smollm2-135m-code-cpu.yaml on a 2-core AVX2 machine, 7 s on a 2-core Zen 4): the target is under 10%.
"""

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_cli import sandbox  # noqa: E402
from grpo_cli.config import DataSettings  # noqa: E402
from grpo_cli.data import load_examples  # noqa: E402
from grpo_cli.sandbox import Program  # noqa: E402
from rewards.code import code_tests_reward  # noqa: E402


def median_seconds(run, times: int) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=30, help="start-ups measured for each median")
    p.add_argument("--completions", type=int, default=64, help="HumanEval completions in the batch (at most 164)")
    p.add_argument("--step-seconds", type=float, default=16.0, help="a CPU demo step, for the share the batch takes")
    args = p.parse_args(argv)

    box = sandbox.resolve()
    if box.problem:
        sys.exit(f"no sandbox: {box.problem}")
    print(f"Sandbox: {box.line()}; Python {box.python}")

    # Start-up, by parts
    true = [*box.prefix, "--", "/usr/bin/true"]
    bwrap = median_seconds(lambda: subprocess.run(true, check=True), args.runs)
    python = median_seconds(lambda: subprocess.run([box.python, "-I", "-S", "-B", "-c", "pass"], check=True), args.runs)
    whole = median_seconds(lambda: box.run(Program("pass")), args.runs)
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    judged = median_seconds(
        lambda: box.run(Program("def add(a, b): return a + b", test=test, entry_point="add")), args.runs
    )
    weak = sandbox.resolve("rlimits")
    rlimits = median_seconds(lambda: weak.run(Program("pass")), args.runs)
    print(f"Start-up, median of {args.runs}:")
    print(f"  bwrap alone (namespaces, mounts, /usr/bin/true)   {bwrap * 1000:6.1f} ms")
    print(f"  the sandbox's Python alone (-I -S)                {python * 1000:6.1f} ms")
    print(f"  one sandboxed run of an empty program             {whole * 1000:6.1f} ms")
    print(f"  one judged call (judge, forked candidate, 1 call) {judged * 1000:6.1f} ms")
    print(f"  the same under rlimits only (no namespaces)       {rlimits * 1000:6.1f} ms")

    # A batch, as a reward scores it
    examples = load_examples(DataSettings(dataset="humaneval", split="test", system_prompt=""))
    examples = examples[: args.completions]
    completions = [f"```python\n{e['answer']}```" for e in examples]
    columns = {k: [e[k] for e in examples] for k in ("test", "entry_point", "setup")}
    timings = {}
    for workers in sorted({1, box.workers}):
        sandbox._current = dataclasses.replace(box, workers=workers)
        started = time.perf_counter()
        scores = code_tests_reward(None, completions, **columns)
        timings[workers] = time.perf_counter() - started
        assert scores == [1.0] * len(completions), "a canonical solution failed"
    print(f"Scoring {len(completions)} HumanEval completions with code_tests (all pass):")
    for workers, seconds in timings.items():
        print(f"  {workers} at a time: {seconds:5.2f} s ({seconds / len(completions) * 1000:.0f} ms a completion)")
    best = min(timings.values())
    print(
        f"  {best:.2f} s is {best / args.step_seconds:.1%} of a {args.step_seconds:g} s CPU demo step "
        f"({len(completions)} completions a step; the target is under 10%)"
    )
    per_run = timings[1] / len(completions)
    tests = per_run - whole
    print(
        f"Where the time goes: one completion alone {per_run * 1000:.0f} ms, an empty program {whole * 1000:.0f} ms: "
        f"start-up is nearly all of it (Python {python * 1000:.0f} ms, the namespaces about "
        f"{max(whole - rlimits, 0) * 1000:.0f} ms more than rlimits only); the tests add "
        + (f"{tests * 1000:.0f} ms." if tests > 0.005 else "less than 5 ms.")
    )


if __name__ == "__main__":
    main()
