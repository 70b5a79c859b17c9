"""What a run leaves to read: metrics.jsonl and .csv, completions.jsonl, rewards.png."""

import csv
import io
import json
import os
import tempfile
from pathlib import Path

METRICS = "metrics.jsonl"
SAMPLES = "completions.jsonl"
PLOT = "rewards.png"


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_text(path: Path, text: str | bytes) -> None:
    """Through a temporary file and a rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def keep_metrics_until(output_dir: Path, step: int) -> None:
    """On resume from checkpoint-N, drop the lines after step N: they are trained again."""
    rows = [r for r in read_metrics(output_dir) if r["step"] <= step]
    write_text(Path(output_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def append_metrics(output_dir: Path, row: dict) -> None:
    with (Path(output_dir) / METRICS).open("a") as f:
        f.write(json.dumps(row) + "\n")
    rows = read_metrics(output_dir)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(Path(output_dir) / "metrics.csv", out.getvalue())


def append_samples(output_dir: Path, step: int, logs: dict, count: int = 4) -> None:
    """A few prompt/completion/reward rows of the latest generation batch (TRL keeps them in ``_logs``); a tool
    conversation as its transcript (calls, results, answer)."""
    from grpo_cli.generate import Conversation, transcript

    prompts, completions = list(logs.get("prompt", [])), list(logs.get("completion", []))
    rewards = {name: list(values) for name, values in logs.get("rewards", {}).items()}
    with (Path(output_dir) / SAMPLES).open("a") as f:
        for i in range(min(count, len(completions))):
            prompt, completion = prompts[i], completions[i]
            f.write(json.dumps({
                "step": step,
                "prompt": prompt[-1]["content"] if isinstance(prompt, list) else prompt,
                "completion": transcript(Conversation(completion)) if isinstance(completion, list) else completion,
                "rewards": {name: values[i] for name, values in rewards.items() if i < len(values)},
            }) + "\n")  # fmt: skip


def plot(output_dir: Path) -> Path | None:
    """rewards.png: mean reward (total and each function) and completion length over steps, tool calls per
    completion and their failure rate when the run has tools, and the held-out accuracy (and tool use) when the
    run evaluates while training."""
    rows = read_metrics(output_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held_out = [r for r in rows if "eval_accuracy" in r]
    rows = [r for r in rows if "reward" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    panels = 3 if held_out else 2
    fig, (top, bottom, *evaluation) = plt.subplots(panels, 1, figsize=(8, 3 * panels), sharex=True)
    top.plot(steps, [r["reward"] for r in rows], color="black", linewidth=2, label="total")
    for key in (k for k in rows[-1] if k.startswith("rewards/") and k.endswith("/mean")):
        top.plot(steps, [r.get(key) for r in rows], linewidth=1, label=key.split("/")[1])
    top.set_ylabel("mean reward")
    top.legend(fontsize=8, loc="best")
    top.grid(alpha=0.3)
    bottom.plot(steps, [r.get("completions/mean_length") for r in rows], color="tab:gray")
    bottom.set_ylabel("completion length (tokens)")
    bottom.grid(alpha=0.3)
    if "tools/call_frequency" in rows[-1]:  # on a second axis: calls per completion, and the share that failed
        tools = bottom.twinx()
        tools.plot(steps, [r.get("tools/call_frequency") for r in rows], color="tab:orange", label="tool calls")
        tools.plot(steps, [r.get("tools/failure_frequency") for r in rows], color="tab:red", linestyle=":",
                   label="tool failure rate")  # fmt: skip
        tools.set_ylabel("tool calls / completion; failure rate")
        tools.legend(fontsize=8, loc="best")
    for panel in evaluation:  # held-out accuracy and format rate, from step 0 (before training)
        at = [r["step"] for r in held_out]
        panel.plot(at, [r["eval_accuracy"] for r in held_out], marker="o", color="tab:green", label="accuracy")
        panel.plot(at, [r["eval_format_rate"] for r in held_out], marker=".", color="tab:blue", label="format rate")
        if "eval_tool_use_rate" in held_out[-1]:
            panel.plot(at, [r.get("eval_tool_use_rate") for r in held_out], marker="x", color="tab:orange",
                       label="used a tool")  # fmt: skip
        panel.set_ylabel("held-out (greedy)")
        panel.set_ylim(0, 1.05)
        panel.legend(fontsize=8, loc="best")
        panel.grid(alpha=0.3)
    (evaluation or [bottom])[-1].set_xlabel("step")
    fig.suptitle(f"{Path(output_dir).name}: {len(rows)} steps")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_text(Path(output_dir) / PLOT, buffer.getvalue())
    return Path(output_dir) / PLOT
