import csv
import json

import pytest

from grpo_cli.config import DataSettings
from grpo_cli.errors import GrpoError
from grpo_cli.evaluate import evaluate, flipped
from grpo_cli.generate import Pair, Sampling, converse


class FakePair:
    """Stands in for the loaded model: the base answers without tags, the adapter with them; prompts and the
    loop are Pair's own."""

    lora_dir, tokenizer, toolset, manifest = "adapter", None, None, {}
    messages = Pair.messages

    def __init__(self, answers):
        self.answers = answers

    def answer(self, prompts, sampling, adapter, rows=None):
        from conftest import FakeTokenizer

        def generate(texts, sampling):
            if not adapter:
                return [f"it is {a}" for a in self.answers]
            return [f"<answer>{a}</answer>" if i % 2 == 0 else "<answer>0</answer>" for i, a in enumerate(self.answers)]

        return converse(generate, FakeTokenizer(), prompts, sampling, self.toolset, rows)


def test_eval_metrics_on_known_answers(write_jsonl, tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i + 1)} for i in range(4)]
    data = DataSettings(dataset=str(write_jsonl(rows)), system_prompt="")
    summaries, base, tuned = evaluate(
        FakePair([r["answer"] for r in rows]), data, Sampling(), ["numeric_correctness"], tmp_path / "eval"
    )
    assert summaries["base"]["accuracy"] == 0.0 and summaries["base"]["format_rate"] == 0.0
    assert summaries["adapter"]["accuracy"] == 0.5 and summaries["adapter"]["format_rate"] == 1.0
    assert summaries["adapter"]["numeric_correctness"] == 1.0  # 2.0 on half of them
    assert summaries["base"]["mean_length"] == 3.0  # "it is N": three words without a tokenizer
    assert [change for change, _, _ in flipped(base, tuned, "correct")] == ["gained", "gained"]

    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["prompts"] == 4 and saved["summary"] == summaries
    table = list(csv.DictReader((tmp_path / "eval" / "eval.csv").open()))
    assert len(table) == 8 and {r["model"] for r in table} == {"base", "adapter"}


def test_eval_refuses_to_overwrite_results(write_jsonl, tmp_path):
    from grpo_cli.errors import GrpoError

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text("{}")
    data = DataSettings(dataset=str(write_jsonl([{"question": "q", "answer": "1"}])))
    with pytest.raises(GrpoError, match="pass --overwrite"):
        evaluate(FakePair(["1"]), data, Sampling(), ["numeric_correctness"], tmp_path / "eval")
    assert (tmp_path / "eval" / "eval.json").read_text() == "{}"


def test_a_recipe_gives_eval_a_tasks_settings_and_difficulty_without_an_adapter(tmp_path):
    from grpo_cli.cli import scored_as, task_as_trained
    from grpo_cli.data import load_examples

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "dataset: reasoning-gym:chain_sum\ndifficulty: 3\ntask_settings: {seed: 5}\nsystem_prompt: S\n"
        "rewards: [answer_tag, task_score:2]\nmax_completion_length: 24\n"
    )
    manifest, trained = scored_as(None, recipe)
    assert manifest == {"system_prompt": "S", "rewards": ["answer_tag", "task_score:2"]}
    assert trained["train"]["max_completion_length"] == 24 and trained["model"]["model"] == "smollm2-135m"
    task = task_as_trained("reasoning-gym:chain_sum", trained["data"])
    assert task == {"task_settings": {"seed": 5}, "difficulty": 3}
    test = DataSettings(dataset="reasoning-gym:chain_sum", split="test", system_prompt="S", limit=3, **task)
    as_loaded = DataSettings(dataset="reasoning-gym:chain_sum", split="test", system_prompt="S", limit=3)
    assert load_examples(test) != load_examples(as_loaded)  # level 3 of seed 5, not reasoning-gym's defaults

    from tests.fakes import adapter_dir

    adapter = adapter_dir(tmp_path / "adapter")
    manifest, trained = scored_as(adapter, recipe)  # the recipe named on the command line, over the adapter's
    assert manifest["system_prompt"] == "S" and trained["data"]["difficulty"] == 3


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("difficulty: 99\n", "difficulty 99: chain_sum's curriculum has levels 0 to"),
        ("task_settings: {digits: 2}\n", "chain_sum has no setting 'digits'"),
        ("curriculum: {raise_at: 2}\n", "curriculum: raise_at must be a share in"),
    ],
)
def test_a_bad_recipe_for_eval_is_one_line_before_any_model_loads(tmp_path, recipe, message):
    import subprocess
    import sys

    (tmp_path / "recipe.yaml").write_text(f"dataset: reasoning-gym:chain_sum\nrewards: [task_score]\n{recipe}")
    result = subprocess.run(
        [sys.executable, "-m", "grpo_cli", "eval", "--config", str(tmp_path / "recipe.yaml"), "--output-dir",
         str(tmp_path / "eval")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Plan:" not in result.stdout  # refused before the model loaded


def eval_until_the_model(tmp_path, monkeypatch, *args) -> dict:
    """`grpo eval` up to the model's loading: the data settings it loads and what it hands the model."""
    from typer.testing import CliRunner

    from grpo_cli import cli, data, generate, models

    seen, load = {}, data.load_examples

    class Loaded(Exception):
        pass

    def pair(model, lora, toolset=None):
        seen.update(model=model, toolset=toolset)
        raise Loaded

    monkeypatch.setattr(data, "load_examples", lambda d, *a, **k: seen.setdefault("data", d) and load(d, *a, **k))
    monkeypatch.setattr(generate, "Pair", pair)
    monkeypatch.setattr(models, "unsloth_first", lambda: None)  # nothing loads here: no need to import it first
    result = CliRunner().invoke(cli.app, ["eval", *map(str, args), "--output-dir", str(tmp_path / "eval")])
    assert isinstance(result.exception, Loaded), result.output
    return seen


def test_eval_reads_a_recipes_fields_and_offers_its_tools(tmp_path, monkeypatch, write_jsonl):
    rows = write_jsonl([{"problem": "1 + 1", "solution": "2"}], "problems.jsonl")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset: {rows}\nquestion_field: problem\nanswer_field: solution\n")
    data = eval_until_the_model(tmp_path, monkeypatch, "--config", recipe)["data"]
    assert (data.question_field, data.answer_field) == ("problem", "solution")

    seen = eval_until_the_model(tmp_path, monkeypatch, "--config", "recipes/smollm2-135m-tools-cpu.yaml", "--limit", 2)
    assert seen["toolset"].names == ["calculator"] and seen["toolset"].max_iterations == 1


def test_with_an_adapter_a_recipe_replaces_only_the_settings_it_gives(tmp_path):
    from grpo_cli.cli import scored_as
    from tests.fakes import adapter_dir

    adapter = adapter_dir(tmp_path / "adapter")
    manifest = json.loads((adapter / "grpo.json").read_text())
    manifest |= {"system_prompt": "A", "rewards": ["answer_tag", "task_score"]}
    manifest["settings"] |= {"data": {"dataset": "arithmetic", "question_template": "Q: {question}"},
                             "train": {"max_completion_length": 64}}  # fmt: skip
    (adapter / "grpo.json").write_text(json.dumps(manifest))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset: reasoning-gym:chain_sum\ndifficulty: 2\n")
    said, trained = scored_as(adapter, recipe)
    assert said["system_prompt"] == "A" and said["rewards"] == ["answer_tag", "task_score"]
    assert trained["train"]["max_completion_length"] == 64 and trained["data"]["question_template"] == "Q: {question}"
    assert trained["data"]["dataset"] == "reasoning-gym:chain_sum" and trained["data"]["difficulty"] == 2
    recipe.write_text("dataset: reasoning-gym:chain_sum\nsystem_prompt: R\nmax_completion_length: 32\n")
    said, trained = scored_as(adapter, recipe)
    assert said["system_prompt"] == "R" and trained["train"]["max_completion_length"] == 32
    recipe.write_text("model: smollm2-135m\ndataset: reasoning-gym:chain_sum\n")
    with pytest.raises(GrpoError, match="the recipe's model smollm2-135m is not the adapter's base .*: drop model"):
        scored_as(adapter, recipe)


def test_eval_leaves_the_training_only_curriculum_conditions_to_train(tmp_path):
    from grpo_cli.cli import scored_as, task_as_trained

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset: reasoning-gym:chain_sum\nrewards: [task_score]\ncurriculum: {follow: held_out}\n")
    _, trained = scored_as(None, recipe)  # no eval_steps: train refuses it, eval has no use for them
    assert task_as_trained(None, trained["data"]) == {"task_settings": {}, "difficulty": 0}  # the curriculum's start
