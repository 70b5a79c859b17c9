import subprocess
import sys

import pytest
from typer.testing import CliRunner

from grpo_cli.cli import app

COMMANDS = ["train", "save-lora", "infer", "eval", "doctor", "serve"]


def grpo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "grpo_cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_train_help_lists_every_reward_name():
    from rewards import REWARDS

    output = " ".join(CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output.split())
    assert all(name in output for name in REWARDS)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--num-generations", "4", "--batch-size", "6"], "use --num-generations 2 or 3 or 6"),
        (["train", "--reward", "corectness"], "did you mean correctness?"),
        (["train", "--model", "./no/such/model"], "model path ./no/such/model does not exist"),
        (["train", "--model", "gpt5"], "unknown model 'gpt5': use smollm2-135m"),
        (["train", "--dataset", "missing.jsonl", "--model", "./nothing"], "does not exist"),
        (["train", "--dataset", "missing.jsonl"], "data file missing.jsonl does not exist"),
        (["train", "--model", "."], "is not a model directory (no config.json)"),
        (["train", "--lora-rank", "0"], "lora_rank must be a positive integer, got 0"),
        (["train", "--learning-rate", "-1"], "learning_rate must be positive"),
        (["train", "--reward", "rewards.reference:STRICT_FORMAT"], "is not a callable"),
        (["train", "--reward", "no_such_mod:f"], "reward module no_such_mod does not import"),
        (["infer", "--lora", ".", "--prompt", "hi"], "is not a LoRA adapter (missing adapter_config.json"),
        (
            ["infer", "--lora", "nowhere", "--prompt", "hi"],
            "nowhere does not exist: give an adapter, a training output",
        ),
        (["save-lora", "nowhere", "out"], "nowhere does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    out = ["--output-dir", str(tmp_path / "out")] if args[0] == "train" else []
    result = grpo(*args, *out, cwd=tmp_path)
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


def test_unknown_recipe_key_and_empty_prompts_file(tmp_path):
    (tmp_path / "r.yaml").write_text("num_generation: 4\n")
    result = grpo("train", "--config", "r.yaml", cwd=tmp_path)
    assert (
        result.returncode == 2
        and "unknown setting 'num_generation' in r.yaml: did you mean 'num_generations'?" in result.stderr
    )
    (tmp_path / "empty.txt").write_text("\n")
    result = grpo("infer", "--prompts-file", "empty.txt", cwd=tmp_path)
    assert result.returncode == 2 and "prompts file empty.txt is empty: put one prompt on each line" in result.stderr


def test_report_to_a_logger_that_is_not_installed(tmp_path):
    (tmp_path / "r.yaml").write_text("report_to: trackio\n")
    result = grpo("train", "--config", "r.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "trackio is not installed: pip install trackio, or use --report-to none" in (
        result.stderr
    )
    result = grpo("train", "--report-to", "no_such_logger", cwd=tmp_path)
    assert result.returncode == 2 and "'no_such_logger' is not a logger grpo knows: use none, tensorboard" in (
        result.stderr
    )
    assert not any(tmp_path.iterdir()) or sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_resume_without_a_run_or_a_checkpoint(tmp_path):
    result = grpo("train", "--resume", "latest", "--output-dir", "run", cwd=tmp_path)
    assert result.returncode == 2 and "run holds no grpo.json from an earlier run" in result.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "grpo.json").write_text(
        '{"settings": {"model": {}, "data": {}, "train": {"output_dir": "run"}}}'
    )
    result = grpo("train", "--resume", "latest", "--output-dir", "run", cwd=tmp_path)
    assert result.returncode == 2 and "--resume: no checkpoint checkpoint-N in run" in result.stderr
    # a run of another model resumes with its own settings, not the embedded model's (batch 16 is not a multiple of 6)
    (tmp_path / "run" / "grpo.json").write_text(
        '{"settings": {"model": {"model": "qwen2.5-1.5b"}, "data": {}, "train": {"output_dir": "run", '
        '"per_device_train_batch_size": 6}}}'
    )
    result = grpo("train", "--resume", "latest", "--output-dir", "run", "--num-generations", "6", cwd=tmp_path)
    assert result.returncode == 2 and "--resume: no checkpoint checkpoint-N in run" in result.stderr


def test_eval_refuses_a_full_output_folder_before_loading_a_model(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text("{}")
    result = grpo("eval", "--output-dir", str(tmp_path / "eval"), "--limit", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "is not empty" in result.stderr
    assert "Plan:" not in result.stdout + result.stderr  # refused before the plan's model loaded


def test_the_model_card_links_nowhere_it_is_not_published():
    from grpo_cli.adapter import model_card

    card = model_card({"base_model": "smollm2-135m", "settings": {}, "rewards": ["answer_tag"]})
    assert "pypi.org" not in card and "trained with grpo" in card
