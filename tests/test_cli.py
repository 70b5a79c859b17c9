import subprocess
import sys

import pytest
from typer.testing import CliRunner

from grpo_cli.cli import app

COMMANDS = ["train", "save-lora", "infer", "eval", "doctor"]


def grpo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "grpo_cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_train_help_lists_every_reward_name():
    from rewards import REWARDS

    output = " ".join(CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output.split())
    assert all(name in output for name in REWARDS)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--num-generations", "4", "--batch-size", "6"], "use --num-generations 2 or 3 or 6"),
        (["train", "--reward", "corectness"], "did you mean correctness?"),
        (["train", "--model", "./no/such/model"], "model path ./no/such/model does not exist"),
        (["train", "--model", "gpt5"], "unknown model 'gpt5': use smollm2-135m"),
        (["train", "--dataset", "missing.jsonl", "--model", "./nothing"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    result = grpo(*args, "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path):
    result = grpo("--debug", "train", "--max-steps", "0", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_non_empty_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = grpo("train", "--output-dir", str(out), "--max-steps", "1")
    assert result.returncode == 2 and "is not empty: pass --resume latest to continue it, --overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
