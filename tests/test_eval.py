import csv
import json

import pytest

from grpo_cli.config import DataSettings
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
