import pytest

from grpo_cli.config import DataSettings
from grpo_cli.data import arithmetic_problems, load_examples, to_examples
from grpo_cli.errors import GrpoError
from tests.conftest import SHARED_GSM8K


def test_generated_set_is_seeded_and_held_out_split_is_disjoint():
    train, test = arithmetic_problems("train"), arithmetic_problems("test")
    assert train == arithmetic_problems("train") and len(test) == 200
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert all(r["answer"].isdigit() for r in train + test)


def test_examples_are_chat_prompts_with_answers():
    [example] = load_examples(DataSettings(system_prompt="Be brief.", limit=1))
    assert example["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert example["prompt"][1]["role"] == "user" and example["answer"].isdigit()


@pytest.mark.skipif(not SHARED_GSM8K.is_dir(), reason="the GSM8K files in ../shared/datasets/gsm8k are not present")
def test_gsm8k_from_the_shared_files():
    examples = load_examples(DataSettings(dataset=str(SHARED_GSM8K / "train.jsonl")))
    assert len(examples) == 7473
    first = examples[0]
    assert first["answer"] == "72" and first["prompt"][1]["content"].startswith("Natalia sold clips")
    assert all("," not in e["answer"] and "####" not in e["answer"] for e in examples)


def test_gsm8k_answers_drop_rows_without_the_marker(write_jsonl, capsys):
    path = write_jsonl([{"question": "q1", "answer": "work\n#### 1,300"}, {"question": "q2", "answer": "no marker"}])
    examples = load_examples(DataSettings(dataset=str(path)))
    assert [e["answer"] for e in examples] == ["1300"]
    assert "Dropped 1 rows without a '####' answer line" in capsys.readouterr().out


def test_csv_with_custom_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("problem,solution\nWhat is 2+2?,4\nWhat is 3+3?,6\n")
    examples = load_examples(DataSettings(dataset=str(path), question_field="problem", answer_field="solution"))
    assert [(e["prompt"][-1]["content"], e["answer"]) for e in examples] == [
        ("What is 2+2?", "4"),
        ("What is 3+3?", "6"),
    ]


def test_json_and_parquet(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "q", "answer": "1"}]
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows * 2))
    for name in ("d.json", "d.parquet", "lines.json"):
        assert load_examples(DataSettings(dataset=str(tmp_path / name)))[0]["answer"] == "1"


def test_a_home_relative_file_and_glob(tmp_path, monkeypatch, write_jsonl):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl([{"question": "q", "answer": "1"}], "d.jsonl")
    for name in ("~/d.jsonl", "~/*.jsonl"):
        assert load_examples(DataSettings(dataset=name))[0]["answer"] == "1"


def test_max_prompt_length_drops_long_prompts(write_jsonl, fake_tokenizer, capsys):
    path = write_jsonl([{"question": "short", "answer": "1"}, {"question": "a " * 50, "answer": "2"}])
    settings = DataSettings(dataset=str(path), system_prompt="", max_prompt_length=10)
    assert [e["answer"] for e in load_examples(settings, fake_tokenizer)] == ["1"]
    assert "Dropped 1 of 2 prompts longer than 10 tokens" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, name, kwargs, message",
    [
        (None, "missing.jsonl", {}, "data file .*missing.jsonl does not exist"),
        ("", "empty.jsonl", {}, "holds no rows"),
        ('{"question": "q", "answer": "1"}\n{"question": oops}\n', "bad.jsonl", {}, "bad.jsonl line 2 is not valid JSON"),
        ("a,b\n", "data.txt", {}, "unknown data format '.txt'"),
        ('{"q": "x", "a": "1"}\n', "fields.jsonl", {}, r"field 'question' is not in the data \(fields: q, a\): use --question-field"),
        ('{"question": "x", "a": "1"}\n', "f2.jsonl", {}, "use --answer-field"),
        ('{"question": "a long question", "answer": "1"}\n', "long.jsonl", {"max_prompt_length": 2},
         "every one of 1 prompts is longer than max_prompt_length 2 tokens: raise --max-prompt-length"),
    ],
)  # fmt: skip
def test_bad_data_says_how_to_fix(tmp_path, fake_tokenizer, content, name, kwargs, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(GrpoError, match=message):
        load_examples(DataSettings(dataset=str(path), **kwargs), fake_tokenizer)


def test_to_examples_without_system_prompt():
    examples, dropped = to_examples([{"question": "q", "answer": "a"}], DataSettings(system_prompt=""))
    assert examples == [{"prompt": [{"role": "user", "content": "q"}], "answer": "a"}] and dropped == 0


def test_a_hub_style_folder_and_a_save_to_disk_folder_by_split(tmp_path):
    from datasets import Dataset, DatasetDict

    hub = tmp_path / "hub-style"
    (hub / "data").mkdir(parents=True)
    (hub / "data" / "train.jsonl").write_text('{"question": "q1", "answer": "1"}\n{"question": "q2", "answer": "2"}\n')
    (hub / "data" / "test.jsonl").write_text('{"question": "t1", "answer": "3"}\n')
    assert [e["answer"] for e in load_examples(DataSettings(dataset=str(hub)))] == ["1", "2"]
    assert [e["answer"] for e in load_examples(DataSettings(dataset=str(hub), split="test"))] == ["3"]

    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list([{"question": "q", "answer": "7"}]),
                 "test": Dataset.from_list([{"question": "t", "answer": "8"}])}).save_to_disk(saved)  # fmt: skip
    assert load_examples(DataSettings(dataset=str(saved), split="test"))[0]["answer"] == "8"
    with pytest.raises(GrpoError, match=r"has no split 'validation' \(splits: train, test\): use --split NAME"):
        load_examples(DataSettings(dataset=str(saved), split="validation"))
    single = tmp_path / "single"
    Dataset.from_list([{"question": "q", "answer": "9"}]).save_to_disk(single)
    assert load_examples(DataSettings(dataset=str(single)))[0]["answer"] == "9"


def test_globbed_files_and_conversational_rows(tmp_path, write_jsonl):
    write_jsonl([{"question": "a", "answer": "1"}], "part-1.jsonl")
    write_jsonl([{"question": "b", "answer": "2"}], "part-2.jsonl")
    examples = load_examples(DataSettings(dataset=str(tmp_path / "part-*.jsonl")))
    assert sorted(e["answer"] for e in examples) == ["1", "2"]
    with pytest.raises(GrpoError, match="no file matches"):
        load_examples(DataSettings(dataset=str(tmp_path / "nothing-*.jsonl")))

    chat = [{"role": "user", "content": "2+2?"}]
    write_jsonl([{"prompt": chat, "answer": "4"}, {"prompt": [{"role": "system", "content": "Own."}] + chat,
                                                   "answer": "4"}], "chat.jsonl")  # fmt: skip
    plain, own = load_examples(DataSettings(dataset=str(tmp_path / "chat.jsonl"), system_prompt="Sys."))
    assert plain["prompt"] == [{"role": "system", "content": "Sys."}] + chat  # added: it had none
    assert own["prompt"][0] == {"role": "system", "content": "Own."} and len(own["prompt"]) == 2


def test_an_offline_hub_id_says_what_to_pass_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    started = __import__("time").monotonic()
    with pytest.raises(GrpoError, match=r"someorg/no-such-data is a hub data set and the hub is offline here .*: "
                                        r"download it where the hub is reachable"):  # fmt: skip
        load_examples(DataSettings(dataset="someorg/no-such-data"))
    assert __import__("time").monotonic() - started < 30  # no minute of retries


def test_eval_set_is_the_test_split_else_a_seeded_slice_held_out_from_training(write_jsonl):
    from grpo_cli.data import eval_examples

    train = load_examples(DataSettings(limit=50))
    held, kept, described = eval_examples(DataSettings(), train, limit=10, seed=1)
    assert described == "arithmetic (test)" and len(held) == 10 and kept == train  # the generated set has a test split

    path = write_jsonl([{"question": f"q{i}", "answer": str(i)} for i in range(40)])
    train = load_examples(DataSettings(dataset=str(path)))
    held, kept, described = eval_examples(DataSettings(dataset=str(path)), train, limit=5, seed=1)
    assert described == "5 prompts held out from the training data (seed 1)"
    assert len(kept) == 35 and not {e["answer"] for e in held} & {e["answer"] for e in kept}
    assert eval_examples(DataSettings(dataset=str(path)), train, limit=5, seed=1)[0] == held  # seeded

    other = write_jsonl([{"question": "e", "answer": "9"}], "eval.jsonl")
    held, kept, described = eval_examples(DataSettings(dataset=str(path), eval_dataset=str(other)), train, 5, 1)
    assert [e["answer"] for e in held] == ["9"] and kept == train
    with pytest.raises(GrpoError, match="has no split 'dev'"):
        eval_examples(DataSettings(eval_split="dev", dataset=str(path.parent)), train, 5, 1)
