"""The data sources' registry and reasoning-gym's tasks as a source: rows, held-out items, settings, errors, and the
task's verifier as the reward."""

import dataclasses
import json

import pytest

from grpo_cli.config import DataSettings, load_settings
from grpo_cli.data import SOURCES, eval_examples, load_examples, source, to_examples
from grpo_cli.data.tasks import entry
from grpo_cli.errors import GrpoError
from rewards import REWARDS, resolve
from rewards.tasks import score_answers

CHAIN = DataSettings(dataset="reasoning-gym:chain_sum", task_settings={"size": 60}, difficulty=0, system_prompt="S")


def test_every_source_is_found_by_its_name_or_prefix_and_the_rest_are_files_or_the_hub():
    assert set(SOURCES) == {
        "arithmetic",
        "big-arithmetic",
        "functions",
        "two-step-functions",
        "harder-functions",
        "humaneval",
        "reasoning-gym",
    }
    assert source("reasoning-gym:gcd") is SOURCES["reasoning-gym"]
    assert source("data/train.jsonl") is None and source("openai/gsm8k") is None and source("c:/x.csv") is None


def test_task_rows_carry_the_key_that_regenerates_their_entry():
    examples = load_examples(CHAIN)
    assert len(examples) == 60
    first = examples[0]
    assert first["prompt"][0] == {"role": "system", "content": "S"}
    dataset, item = entry(first["task"])
    assert first["prompt"][-1]["content"] == item["question"] and first["answer"] == item["answer"]
    assert dataset.score_answer(item["answer"], item) == 1.0
    level_0 = json.loads(first["task"])["config"]
    assert (level_0["min_terms"], level_0["max_digits"]) == (2, 1)  # chain_sum's curriculum at level 0


def test_held_out_items_come_from_their_own_seed_and_share_no_question_with_training():
    train = load_examples(dataclasses.replace(CHAIN, task_settings={"size": 400}))
    test = load_examples(dataclasses.replace(CHAIN, split="test"))
    assert len(test) == 200
    seeds = {json.loads(e["task"])["config"]["seed"] for e in test} | {
        json.loads(e["task"])["config"]["seed"] for e in train
    }
    assert len(seeds) == 2
    questions = {e["prompt"][-1]["content"] for e in test}
    assert not questions & {e["prompt"][-1]["content"] for e in train}
    held, kept, described = eval_examples(CHAIN, train, 50, 0)
    assert len(held) == 50 and kept == train and described == "reasoning-gym:chain_sum (test)"


def test_the_same_settings_give_the_same_items_and_the_seed_others():
    again = load_examples(CHAIN)
    assert again == load_examples(CHAIN)
    other = load_examples(dataclasses.replace(CHAIN, task_settings={"size": 60, "seed": 7}))
    assert [e["prompt"] for e in other] != [e["prompt"] for e in again]


def test_a_task_with_many_right_answers_keeps_an_empty_answer():
    rows = [{"question": "Color the graph", "answer": "", "task": "{}"}]
    settings = DataSettings(dataset="reasoning-gym:graph_color", system_prompt="")
    assert to_examples(rows, settings)[0][0]["answer"] == ""
    with pytest.raises(GrpoError, match="'answer' is empty"):
        to_examples([{"question": "q", "answer": "", "task": "{}"}], DataSettings(dataset="file.jsonl"))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dataset": "reasoning-gym:chain_summ"}, "has no task 'chain_summ': did you mean reasoning-gym:chain_sum?"),
        ({"dataset": "reasoning-gym:"}, "reasoning-gym has no task ''"),
        ({"dataset": "reasoning-gym:composite"}, "has no task 'composite'"),
        ({"task_settings": {"min_term": 3}}, "chain_sum has no setting 'min_term': did you mean 'min_terms'?"),
        ({"task_settings": {"min_terms": 3, "max_terms": 2}}, r"do not hold \(max_terms must be >= min_terms\)"),
        ({"difficulty": 40}, "difficulty 40: chain_sum's curriculum has levels 0 to 10"),
        ({"dataset": "reasoning-gym:acre", "difficulty": 1}, "no curriculum for acre"),
        ({"difficulty": 1, "task_settings": {"min_terms": 3}}, "min_terms is set by the difficulty level"),
        ({"task_settings": {"size": 0}}, "size must be a positive number of items"),
        ({"task_settings": {"seed": "a"}}, "seed must be a whole number, got 'a'"),
        ({"split": "validation"}, "has the splits train and test, not 'validation'"),
    ],
)  # fmt: skip
def test_a_bad_task_or_setting_is_one_line(settings, message):
    with pytest.raises(GrpoError, match=message):
        load_examples(dataclasses.replace(CHAIN, **{"task_settings": {}, "difficulty": None, **settings}))


def test_the_recipe_carries_the_task_settings_and_refuses_them_on_another_data_set(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: reasoning-gym:chain_sum\ntask_settings: {min_terms: 2, max_terms: 3}\ndifficulty: 2\n")
    with pytest.raises(GrpoError, match="max_terms is set by the difficulty level"):
        load_examples(load_settings(str(recipe), announce=False).data)
    recipe.write_text("dataset: arithmetic\ndifficulty: 2\n")
    with pytest.raises(GrpoError, match="task_settings and difficulty are a reasoning-gym task's"):
        load_settings(str(recipe), announce=False)
    recipe.write_text("dataset: reasoning-gym:chain_sum\ntask_settings: [1, 2]\n")
    with pytest.raises(GrpoError, match="task_settings must be"):
        load_settings(str(recipe), announce=False)


def test_the_task_score_reward_is_the_tasks_own_verifier_run_apart():
    examples = load_examples(dataclasses.replace(CHAIN, task_settings={"size": 4}))
    keys = [e["task"] for e in examples]
    right = [f"so <answer>{e['answer']}</answer>" for e in examples]
    func, weight = resolve("task_score")
    assert REWARDS["task_score"] is func and weight == 1.0
    assert func(right, task=keys) == [1.0] * 4
    assert func(["<answer>x</answer>", "no tags", "<answer></answer>", right[0]], task=keys) == [0.0, 0.0, 0.0, 0.0]


def test_a_verifier_that_evaluates_the_answer_does_so_outside_this_process(tmp_path):
    """countdown's verifier parses the answer with sympy (eval): what the answer does happens in the child."""
    marker = tmp_path / "ran"
    settings = DataSettings(dataset="reasoning-gym:countdown", task_settings={"size": 2}, system_prompt="")
    key = load_examples(settings)[0]["task"]
    hostile = f"<answer>__import__('pathlib').Path('{marker}').write_text(__import__('os').environ.get('HOME', 'none'))</answer>"
    assert REWARDS["task_score"]([hostile], task=[key])[0] < 1.0
    assert not marker.exists() or marker.read_text() == "none"  # no environment reached it


@pytest.mark.parametrize("name", ["word_sorting", "aiw", "arc_agi", "rearc", "time_intervals"])
def test_tasks_whose_settings_hold_enums_dates_or_nested_settings_regenerate_from_their_key(name):
    rows = load_examples(
        dataclasses.replace(CHAIN, dataset=f"reasoning-gym:{name}", task_settings={"size": 2}, difficulty=None)
    )
    for row in rows:
        dataset, item = entry(row["task"])  # from the key's JSON, its values typed as the task's config has them
        assert dataset.score_answer(item["answer"], item) == 1.0
    answers = [entry(row["task"])[1]["answer"] for row in rows]
    assert score_answers([row["task"] for row in rows], answers) == [1.0] * len(rows)  # and so does the reward's


def test_a_date_setting_given_as_text_is_read_as_a_date():
    data = dataclasses.replace(CHAIN, dataset="reasoning-gym:time_intervals", difficulty=None, task_settings={
        "size": 2, "min_date": "2000-01-01", "max_date": "2001-01-01"})  # fmt: skip
    assert json.loads(load_examples(data)[0]["task"])["config"]["min_date"] == "2000-01-01"
