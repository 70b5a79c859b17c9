"""The curriculum: reasoning-gym's levels for a task, moved by the batches' task scores, the rows staged at the level,
its state across a resume, and its settings checked before anything loads."""

import dataclasses
import json

import pytest
import torch

from grpo_cli.config import DataSettings
from grpo_cli.curriculum import STATE, Curriculum, check_curriculum
from grpo_cli.data import load_examples
from grpo_cli.errors import GrpoError

CHAIN = DataSettings(
    dataset="reasoning-gym:chain_sum", task_settings={"size": 8}, difficulty=0, system_prompt="S",
    curriculum={"raise_at": 0.8, "lower_at": 0.75, "window": 2}, rewards=["task_score"],
)  # fmt: skip


def batch(*groups):
    return torch.tensor([score for group in groups for score in group])


def test_the_level_rises_when_the_task_is_solved_and_falls_when_every_completion_fails():
    curriculum = Curriculum(CHAIN)
    assert curriculum.observe(batch([1, 1], [1, 0.5]), 2) is None  # one batch: the window is not full yet
    moved = curriculum.observe(batch([1, 1], [1, 1]), 2)
    assert curriculum.level == 1 and moved.startswith("curriculum: chain_sum level 0 -> 1: mean task score 0.94")
    assert curriculum.observe(batch([0, 0], [0, 0]), 2) is None  # the window starts again after a move
    moved = curriculum.observe(batch([0, 0], [1, 0]), 2)
    assert curriculum.level == 0 and "75% of groups failed every completion" in moved
    for _ in range(4):  # at the lowest level it stays
        curriculum.observe(batch([0, 0], [0, 0]), 2)
    assert curriculum.level == 0


def test_the_rows_are_the_same_items_generated_again_at_the_level():
    rows = load_examples(CHAIN)
    curriculum = Curriculum(CHAIN)
    assert curriculum.stage(rows) is rows  # at the start level: the rows as loaded
    curriculum.level = 6
    staged = curriculum.stage(rows)
    for before, after in zip(rows, staged):
        old, new = json.loads(before["task"]), json.loads(after["task"])
        assert new["index"] == old["index"] and new["config"]["seed"] == old["config"]["seed"]
        assert new["config"]["max_terms"] > old["config"]["max_terms"]
        assert after["prompt"][0] == {"role": "system", "content": "S"} and after["prompt"] != before["prompt"]
    terms = [
        after["prompt"][-1]["content"].count(" + ") + after["prompt"][-1]["content"].count(" - ") for after in staged
    ]
    assert max(terms) > 1  # more than two terms appear at level 6


def test_the_level_is_saved_with_a_checkpoint_and_resumed(tmp_path, capsys):
    curriculum = Curriculum(CHAIN)
    curriculum.level = 3
    curriculum.observe(batch([1, 0]), 2)
    (tmp_path / STATE).write_text(json.dumps(curriculum.state()))
    resumed = Curriculum(CHAIN)
    resumed.resume(tmp_path)
    assert resumed.state() == curriculum.state() and "resumes at level 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"curriculum": {"raise": 0.9}}, "'raise' is not a curriculum setting"),
        ({"curriculum": {"raise_at": 1.5}}, "raise_at must be a share in"),
        ({"curriculum": {"window": 0}}, "window must be a positive number"),
        ({"curriculum": "yes"}, "give true or a mapping"),
        ({"dataset": "arithmetic"}, "arithmetic is no reasoning-gym:TASK"),
        ({"dataset": "reasoning-gym:acre", "difficulty": None}, "no curriculum for acre"),
        ({"rewards": ["answer_tag"]}, "add the task_score reward"),
    ],
)  # fmt: skip
def test_bad_curriculum_settings_are_one_line(change, message):
    data = dataclasses.replace(CHAIN, **change)
    with pytest.raises(GrpoError, match=message):
        check_curriculum(data, data.rewards)


def test_curriculum_true_takes_the_defaults():
    assert check_curriculum(dataclasses.replace(CHAIN, curriculum=True)) == {
        "raise_at": 0.8, "lower_at": 0.75, "window": 2
    }  # fmt: skip
