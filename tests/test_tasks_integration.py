"""A reasoning-gym task on the embedded SmolLM2-135M, on CPU: training with dynamic sampling and the curriculum, the
held-out evaluation on the task's own seed, a resume, and `grpo eval` on the same held-out items."""

import json

import pytest

from grpo_cli.config import DataSettings
from grpo_cli.data import load_examples
from tests.test_integration import grpo

pytestmark = pytest.mark.slow


def test_a_reasoning_gym_task_trains_with_dynamic_sampling_resumes_and_evaluates(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "dataset: reasoning-gym:chain_sum\ndifficulty: 0\ntask_settings: {size: 40}\n"
        "curriculum: {raise_at: 0.9, window: 1}\nrewards: [answer_tag, task_score]\n"
        "dynamic_sampling: true\ndynamic_sampling_rounds: 1\nwarmup_ratio: 0.0\n"
    )
    out = tmp_path / "out"
    result = grpo(
        "train", "--config", str(recipe), "--max-steps", "2", "--num-generations", "4", "--batch-size", "8",
        "--max-completion-length", "12", "--lora-rank", "4", "--save-steps", "1", "--eval-steps", "2",
        "--eval-limit", "4", "--output-dir", str(out),
    )  # fmt: skip
    assert "Evaluating before step 1 and every 2 steps on reasoning-gym:chain_sum (test)" in result.stdout
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in steps if m["step"] > 0]
    assert [m["step"] for m in trained] == [1, 2]
    for m in trained:
        assert {"dynamic_sampling/dropped_groups", "dynamic_sampling/extra_rounds", "curriculum/level"} <= set(m)
        assert m["dynamic_sampling/extra_rounds"] <= 1 and m["dynamic_sampling/extra_completions"] % 4 == 0
    assert "rewards/task_score_reward/mean" in trained[0] and "eval_accuracy" in steps[0]
    line = next(line for line in result.stdout.splitlines() if line.startswith("step 1/2"))
    assert "level 0" in line and ("every group has spread" in line or "dropped" in line)
    assert (out / "checkpoint-1" / "curriculum.json").is_file()

    grpo("train", "--resume", "latest", "--output-dir", str(out), "--max-steps", "3")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 3

    grpo("eval", "--lora", str(out / "adapter"), "--limit", "4", "--output-dir", str(tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (report["dataset"], report["split"], report["prompts"]) == ("reasoning-gym:chain_sum", "test", 4)
    assert "task_score" in report["summary"]["adapter"]
    test = DataSettings(dataset="reasoning-gym:chain_sum", split="test", difficulty=0, limit=4, system_prompt="")
    assert [row["question"] for row in report["base"]] == [e["prompt"][-1]["content"] for e in load_examples(test)]


ONE_SHOT = (
    "Solve the problem. Write the calculation, then the result inside <answer></answer> tags.\\nExample:\\nQuestion: "
    "State the final answer to the following arithmetic problem: 3 + 4 =\\n3 + 4 = 7 <answer>7</answer>"
)


def test_the_curriculum_follows_the_held_out_accuracy_at_its_level_and_resumes_there(tmp_path):
    """A low raise_at: the base model's held-out accuracy before step 1 raises the level; from then on the
    evaluation reads the same held-out items at the new level, the curve stays on those loaded, and a resume goes on
    at the level the checkpoint saved."""
    import re

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f'dataset: reasoning-gym:chain_sum\ndifficulty: 0\ntask_settings: {{size: 40}}\nsystem_prompt: "{ONE_SHOT}"\n'
        "curriculum: {follow: held_out, raise_at: 0.1, lower_at: 1.0}\nrewards: [answer_tag, task_score]\n"
        "warmup_ratio: 0.0\n"
    )
    out = tmp_path / "out"
    result = grpo(
        "train", "--config", str(recipe), "--max-steps", "2", "--num-generations", "4", "--batch-size", "8",
        "--max-completion-length", "16", "--lora-rank", "4", "--save-steps", "1", "--eval-steps", "1",
        "--eval-limit", "8", "--output-dir", str(out),
    )  # fmt: skip
    assert "curriculum: chain_sum level 0 -> 1: held-out accuracy" in result.stdout, result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m for m in rows if "eval_accuracy" in m}
    assert sorted(evals) == [0, 1, 2] and evals[0]["eval_level"] == 0 and evals[1]["eval_level"] == 1
    assert evals[0]["eval_level_accuracy"] == evals[0]["eval_accuracy"] >= 0.1
    assert evals[1]["curriculum/level"] == 1  # the step's batch was generated at the new level
    assert re.search(r"step 1/2 \| .* \| eval accuracy [\d.]+% \(level 1: [\d.]+%\)", result.stdout)
    # the checkpoint holds the level after the step's evaluation read it
    saved = json.loads((out / "checkpoint-2" / "curriculum.json").read_text())["level"]
    moves = re.findall(r"curriculum: chain_sum level (\d+) -> (\d+)", result.stdout)
    assert saved == int(moves[-1][1])

    resumed = grpo("train", "--resume", "latest", "--output-dir", str(out), "--max-steps", "3")
    assert f"curriculum: chain_sum resumes at level {saved}" in resumed.stdout
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    lowered = re.search(rf"level {saved} -> {saved - 1}: ", resumed.stdout)
    assert last["step"] == 3 and last["eval_level"] == (saved - 1 if lowered else saved)


def test_eval_scores_the_base_model_on_a_recipes_task_settings_and_difficulty(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f'dataset: reasoning-gym:chain_sum\ndifficulty: 4\ntask_settings: {{seed: 5}}\nsystem_prompt: "{ONE_SHOT}"\n'
        "rewards: [answer_tag, task_score]\nmax_completion_length: 16\n"
    )
    grpo("eval", "--config", str(recipe), "--limit", "3", "--output-dir", str(tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["adapter"] is None and {"answer_tag", "task_score"} <= set(report["summary"]["base"])
    test = DataSettings(
        dataset="reasoning-gym:chain_sum", split="test", difficulty=4, task_settings={"seed": 5}, limit=3,
        system_prompt="",
    )  # fmt: skip
    assert [row["question"] for row in report["base"]] == [e["prompt"][-1]["content"] for e in load_examples(test)]
