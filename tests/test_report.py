import csv
import json

from grpo_cli import report


def rows(n):
    return [
        {"step": s, "reward": s / 10, "rewards/answer_tag/mean": s / 20, "completions/mean_length": 30 - s}
        for s in range(1, n + 1)
    ]


def test_metrics_append_as_jsonl_and_csv(tmp_path):
    for row in rows(3):
        report.append_metrics(tmp_path, row)
    assert [r["step"] for r in report.read_metrics(tmp_path)] == [1, 2, 3]
    table = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [float(r["reward"]) for r in table] == [0.1, 0.2, 0.3]


def test_resume_keeps_metrics_up_to_the_checkpoint(tmp_path):
    for row in rows(5):
        report.append_metrics(tmp_path, row)
    report.keep_metrics_until(tmp_path, 3)
    assert [r["step"] for r in report.read_metrics(tmp_path)] == [1, 2, 3]


def test_plot_is_a_png(tmp_path):
    for row in rows(4):
        report.append_metrics(tmp_path, row)
    path = report.plot(tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_without_metrics_writes_nothing(tmp_path):
    assert report.plot(tmp_path) is None and not list(tmp_path.iterdir())


def test_samples(tmp_path):
    logs = {
        "prompt": [[{"role": "user", "content": "2+3?"}]] * 2,
        "completion": [
            [{"role": "assistant", "content": "<answer>5</answer>"}],
            [{"role": "assistant", "content": "6"}],
        ],
        "rewards": {"answer_tag": [1.0, 0.0]},
    }
    report.append_samples(tmp_path, 7, logs)
    lines = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 7, "prompt": "2+3?", "completion": "6", "rewards": {"answer_tag": 0.0}}


def test_plot_adds_the_held_out_accuracy(tmp_path):
    report.append_metrics(tmp_path, {"step": 0, "eval_accuracy": 0.1, "eval_format_rate": 0.2})
    for row in rows(4):
        report.append_metrics(
            tmp_path, row | ({"eval_accuracy": 0.5, "eval_format_rate": 0.9} if row["step"] == 4 else {})
        )
    png = report.plot(tmp_path)
    from PIL import Image

    assert Image.open(png).size == (800, 900)  # three panels: rewards, length, held-out accuracy
