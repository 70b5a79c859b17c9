"""Dynamic sampling against none at the same wall time, over seeds: each run trains the sparse-reward recipe and is
stopped (Ctrl-C: it finishes the step and saves the adapter) after the same number of seconds; `grpo eval` then
scores each adapter on the same held-out items. Writes bench/results/dynamic-sampling-<cpu kind>.md and .json.

    flock /tmp/grpo-cpu.lock python bench/dynamic_sampling_bench.py --seconds 150 --seeds 1 2 3
"""

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-sparse-cpu.yaml"


def run(mode: str, seed: int, seconds: float, out: Path, limit: int) -> dict:
    """One training run stopped at ``seconds`` of wall time, then its held-out score."""
    args = [sys.executable, "-m", "grpo_cli", "train", "--config", str(RECIPE), "--seed", str(seed), "--max-steps",
            "1000", "--save-steps", "1000", "--output-dir", str(out), "--overwrite"]  # fmt: skip
    if mode == "dynamic":
        args.append("--dynamic-sampling")
    started = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    stopped = False
    for line in process.stdout:
        lines.append(line)
        if not stopped and time.monotonic() - started >= seconds:
            process.send_signal(signal.SIGINT)
            stopped = True
    process.wait()
    wall = time.monotonic() - started
    if not (out / "adapter").is_dir():
        raise SystemExit(f"{mode} seed {seed}: no adapter\n{''.join(lines[-20:])}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m["step"] > 0 and "reward" in m]
    evaluated = subprocess.run(
        [sys.executable, "-m", "grpo_cli", "eval", "--lora", str(out / "adapter"), "--limit", str(limit),
         "--output-dir", str(out / "eval"), "--overwrite"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if evaluated.returncode:
        raise SystemExit(f"eval failed: {evaluated.stderr[-2000:]}")
    summary = json.loads((out / "eval" / "eval.json").read_text())["summary"]
    return {
        "mode": mode,
        "seed": seed,
        "wall_seconds": round(wall, 1),
        "steps": len(steps),
        "completions_generated": sum(
            16 + m.get("dynamic_sampling/extra_completions", 0) for m in steps
        ),  # 16: the recipe's batch
        "zero_spread_share": statistics.mean(m["frac_reward_zero_std"] for m in steps) if steps else None,
        "groups_dropped": sum(m.get("dynamic_sampling/dropped_groups", 0) for m in steps),
        "flat_groups_trained": sum(m.get("dynamic_sampling/flat_groups_trained", 0) for m in steps),
        "base_accuracy": summary["base"]["accuracy"],
        "accuracy": summary["adapter"]["accuracy"],
    }


def table(rows: list[dict], seconds: float, limit: int, cpu: str) -> str:
    lines = [
        f"# Dynamic sampling against none, same wall time ({seconds:g} s a run), {cpu}",
        "",
        f"Recipe: `{RECIPE.relative_to(ROOT)}`; held-out accuracy: `grpo eval`, greedy, {limit} items of the task's "
        "own test seed. Command: `flock /tmp/grpo-cpu.lock python bench/dynamic_sampling_bench.py "
        f"--seconds {seconds:g} --seeds {' '.join(str(s) for s in sorted({r['seed'] for r in rows}))}`",
        "",
        "| mode | seed | steps | completions | zero-spread share (sampled) | groups dropped | flat groups trained "
        "| held-out base | held-out after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{r['zero_spread_share']:.0%}" if r["zero_spread_share"] is not None else "-"
        lines.append(
            f"| {r['mode']} | {r['seed']} | {r['steps']} | {r['completions_generated']:g} | {share} | "
            f"{r['groups_dropped']:g} | {r['flat_groups_trained']:g} | {r['base_accuracy']:.0%} | {r['accuracy']:.0%} |"
        )
    lines += [
        "",
        "| mode | held-out after: mean | spread (std over seeds) | min - max | steps: mean |",
        "|---|---|---|---|---|",
    ]
    for mode in ("none", "dynamic"):
        acc = [r["accuracy"] for r in rows if r["mode"] == mode]
        steps = [r["steps"] for r in rows if r["mode"] == mode]
        if acc:
            spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
            lines.append(
                f"| {mode} | {statistics.mean(acc):.1%} | {spread:.1%} | {min(acc):.0%} - {max(acc):.0%} | "
                f"{statistics.mean(steps):.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--limit", type=int, default=50, help="held-out items scored")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "dynamic-sampling-bench")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from grpo_cli import cpu

    kind = cpu.kind()
    rows = []
    for seed in args.seeds:
        for mode in ("none", "dynamic"):
            rows.append(run(mode, seed, args.seconds, args.work / f"{mode}-{seed}", args.limit))
            print(json.dumps(rows[-1]), flush=True)
    results = ROOT / "bench" / "results"
    (results / f"dynamic-sampling-cpu-{kind}.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows, args.seconds, args.limit, f"CPU {kind}")
    (results / f"dynamic-sampling-cpu-{kind}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
