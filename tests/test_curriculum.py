"""The curriculum: reasoning-gym's levels for a task, moved by the batches' task scores, the rows staged at the level,
its state across a resume, and its settings checked before anything loads."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from grpo_cli.config import DataSettings
from grpo_cli.curriculum import STATE, Curriculum, check_curriculum
from grpo_cli.data import load_examples
from grpo_cli.data.tasks import entry
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


def test_after_a_move_no_training_row_asks_a_held_out_question_there():
    data = dataclasses.replace(CHAIN, difficulty=1, task_settings={"size": 50})
    rows = load_examples(data)
    curriculum = Curriculum(data)
    curriculum.level = 0  # lowered to the start of chain_sum's curriculum: a small space of sums
    staged = curriculum.stage(rows)
    held_out = curriculum.stage(load_examples(dataclasses.replace(data, split="test")), held_out=True)
    held = {entry(r["task"])[1]["question"] for r in held_out}  # what the held-out evaluation scores at level 0
    assert held == curriculum.held_out_questions(0) and len(held) > 50
    assert not {entry(r["task"])[1]["question"] for r in staged} & held
    assert [r["task"] for r in curriculum.stage(rows)] == [r["task"] for r in staged]  # the same rows every time
    assert sum(json.loads(r["task"])["index"] != json.loads(s["task"])["index"] for r, s in zip(rows, staged)) > 0


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
        ({"difficulty": None, "task_settings": {"max_terms": 2, "max_digits": 1}},
         "curriculum: drop max_digits from task_settings: the curriculum's levels set it"),
    ],
)  # fmt: skip
def test_bad_curriculum_settings_are_one_line(change, message):
    data = dataclasses.replace(CHAIN, **change)
    with pytest.raises(GrpoError, match=message):
        check_curriculum(data, data.rewards)


def test_without_a_difficulty_the_items_load_at_the_curriculums_start():
    data = dataclasses.replace(CHAIN, difficulty=None, task_settings={"size": 20})
    start = load_examples(dataclasses.replace(data, curriculum=None, difficulty=0))
    assert [r["task"] for r in load_examples(data)] == [r["task"] for r in start]  # level 0, not the task's default
    assert Curriculum(data).start == 0


def test_curriculum_true_takes_the_defaults():
    assert check_curriculum(dataclasses.replace(CHAIN, curriculum=True)) == {
        "raise_at": 0.8, "lower_at": 0.75, "window": 2, "follow": "batch"
    }  # fmt: skip


HELD_OUT = dataclasses.replace(CHAIN, curriculum={"follow": "held_out", "raise_at": 0.5, "window": 2})


def test_following_the_held_out_accuracy_the_batches_only_lower_the_level():
    curriculum = Curriculum(HELD_OUT)
    for _ in range(3):  # solved batches: they raise the level only where the curriculum follows them
        assert curriculum.observe(batch([1, 1], [1, 1]), 2) is None
    assert curriculum.level == 0
    assert curriculum.held_out(0.4, level=0) is None and curriculum.level == 0  # below raise_at
    moved = curriculum.held_out(0.5, level=0)
    assert curriculum.level == 1
    assert moved == "curriculum: chain_sum level 0 -> 1: held-out accuracy 0.50 at level 0 reached 0.5"
    assert curriculum.held_out(0.9, level=0) is None and curriculum.level == 1  # measured at another level: stale
    curriculum.observe(batch([0, 0], [0, 0]), 2)
    moved = curriculum.observe(batch([0, 0], [0, 0]), 2)
    assert curriculum.level == 0 and "100% of groups failed every completion" in moved
    curriculum.level = curriculum.top
    assert curriculum.held_out(1.0, level=curriculum.top) is None  # at the top it stays


def test_following_the_batches_a_held_out_reading_moves_nothing():
    curriculum = Curriculum(CHAIN)
    assert curriculum.held_out(1.0, level=0) is None and curriculum.level == 0


def test_a_level_raised_on_the_held_out_accuracy_is_saved_and_resumed(tmp_path):
    curriculum = Curriculum(HELD_OUT)
    curriculum.held_out(0.75, level=0)
    curriculum.observe(batch([1, 0]), 2)
    (tmp_path / STATE).write_text(json.dumps(curriculum.state()))
    resumed = Curriculum(HELD_OUT)
    resumed.resume(tmp_path)
    assert resumed.state() == curriculum.state() and resumed.level == 1
    assert resumed.held_out(0.75, level=1) is not None and resumed.level == 2  # it goes on from there


@pytest.mark.parametrize(
    "change, train, message",
    [
        ({"curriculum": {"follow": "heldout"}}, {"eval_steps": 5}, "follow must be batch or held_out, got 'heldout'"),
        ({"curriculum": {"follow": ["held_out"]}}, {"eval_steps": 5}, r"follow must be batch or held_out, got \['held_out'\]"),
        ({"curriculum": {"follow": "held_out"}}, {}, "follow held_out reads the held-out evaluation, which is off"),
        ({"curriculum": {"follow": "held_out"}, "eval_dataset": "arithmetic"}, {"eval_steps": 5},
         "not arithmetic: drop eval_dataset, or follow batch"),
    ],
)  # fmt: skip
def test_what_the_curriculum_follows_is_checked_before_anything_loads(change, train, message):
    from grpo_cli.config import TrainSettings

    data = dataclasses.replace(CHAIN, **change)
    with pytest.raises(GrpoError, match=message):
        check_curriculum(data, data.rewards, TrainSettings(**train))
    assert check_curriculum(HELD_OUT, HELD_OUT.rewards, TrainSettings(eval_steps=5))["follow"] == "held_out"


def test_a_recipe_that_follows_the_held_out_accuracy_without_evaluation_is_one_line(tmp_path):
    from grpo_cli.config import load_settings

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "dataset: reasoning-gym:chain_sum\ndifficulty: 0\nrewards: [task_score]\ncurriculum: {follow: held_out}\n"
    )
    with pytest.raises(GrpoError, match="set eval_steps"):
        load_settings(str(recipe), announce=False)
    assert load_settings(str(recipe), {"eval_steps": 2}, announce=False).data.curriculum == {"follow": "held_out"}


def _follow_in_process(rank: int, port: int, out: str) -> None:
    """One of two processes as a launcher starts them: the held-out callback's reading, the main process's figure."""
    import os
    import types

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    from accelerate.state import AcceleratorState

    from grpo_cli import callbacks, dist
    from grpo_cli.config import Settings, TrainSettings
    from grpo_cli.plan import Machine, resolve

    AcceleratorState._reset_state(reset_partial_state=True)  # a fork keeps the test process's one-process state
    dist.start(cpu=True)
    try:
        settings = Settings(data=HELD_OUT, train=TrainSettings(eval_steps=1))
        evaluator = callbacks.held_out_eval(settings, resolve(settings, Machine()), [], None, Path(out))
        evaluator.trainer = types.SimpleNamespace(curriculum=Curriculum(HELD_OUT))
        # the main process alone evaluates; the other one's reading is none of its own
        evaluator.follow({"eval_level": 0.0, "eval_level_accuracy": 0.5} if rank == 0 else None)
        (Path(out) / f"level-{rank}").write_text(str(evaluator.trainer.curriculum.level))
    finally:
        dist.finish()


def test_every_process_moves_on_the_main_process_held_out_accuracy(tmp_path):
    import socket

    import torch.multiprocessing
    import transformers.trainer_callback  # noqa: F401  # imported once, here: the two forks share it

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_follow_in_process, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    assert [(tmp_path / f"level-{rank}").read_text() for rank in (0, 1)] == ["1", "1"]


def test_the_held_out_evaluation_scores_the_items_at_the_level_and_keeps_the_curve_on_those_loaded(
    tmp_path, monkeypatch
):
    """The callback as training builds it; its engine (transformers') answers right exactly the items at level 3."""
    import types

    from grpo_cli import callbacks, generate
    from grpo_cli.config import Settings, TrainSettings
    from grpo_cli.plan import Machine, resolve
    from tests.fakes import word_tokenizer

    tokenizer = word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    held = load_examples(dataclasses.replace(HELD_OUT, split="test", limit=4))
    curriculum = Curriculum(HELD_OUT)
    curriculum.level = 3
    solved = {
        tokenizer.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=False): e["answer"]
        for e in curriculum.stage(held, held_out=True)
    }
    asked = []

    class Engine(generate.TransformersEngine):
        def generate(self, texts, sampling, adapter):
            asked.append(texts)
            return [f"<answer>{solved.get(t, 'none')}</answer>" for t in texts]

    monkeypatch.setattr(generate, "engine_for", lambda plan: Engine)
    settings = Settings(data=HELD_OUT, train=TrainSettings(eval_steps=1))
    plan = dataclasses.replace(resolve(settings, Machine()), trainer="trl")
    evaluator = callbacks.held_out_eval(settings, plan, held, tokenizer, tmp_path)
    evaluator.trainer = types.SimpleNamespace(model=torch.nn.Linear(1, 1), curriculum=curriculum)

    metrics = evaluator.evaluate()
    assert len(asked[-1]) == 8 and set(asked[-1][4:]) == set(solved)  # both sets in one pass
    assert metrics["eval_accuracy"] == 0.0  # the curve: the items as loaded, at the start level
    assert (metrics["eval_level"], metrics["eval_level_accuracy"]) == (3.0, 1.0)
    assert "eval accuracy 0.0% (level 3: 100.0%)" in callbacks.eval_line(metrics)
    evaluator.follow(metrics)
    assert curriculum.level == 4

    curriculum.level = 0  # at the start level one set serves both
    metrics = evaluator.evaluate()
    assert len(asked[-1]) == 4 and metrics["eval_level_accuracy"] == metrics["eval_accuracy"] == 0.0


def test_resuming_with_another_curriculum_or_task_is_reported_as_the_model_or_data_set_are():
    from grpo_cli.config import Settings
    from grpo_cli.runs import changed_meaning

    saved = Settings(data=HELD_OUT).to_dict()
    for change, said in [
        ({"curriculum": None}, "curriculum: {'follow': 'held_out'"),
        ({"curriculum": {**HELD_OUT.curriculum, "follow": "batch"}}, "'follow': 'batch'"),
        ({"difficulty": 2}, "difficulty: 0 -> 2"),
        ({"task_settings": {"size": 9}}, "task_settings: {'size': 8} -> {'size': 9}"),
    ]:
        changes = changed_meaning(saved, Settings(data=dataclasses.replace(HELD_OUT, **change)).to_dict())
        assert len(changes) == 1 and said in changes[0], changes
    assert changed_meaning(saved, Settings(data=HELD_OUT).to_dict()) == []
