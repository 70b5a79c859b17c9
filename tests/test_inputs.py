"""Bad input -> one line that says what is wrong, where, and how to fix it: data files and their contents, recipes,
reward specs. Each case calls the lowest function that shows it; two go through the command."""

import json
import re
import subprocess
import sys

import pytest

from grpo_cli.config import DataSettings, read_recipe
from grpo_cli.data import eval_examples, load_examples
from grpo_cli.errors import GrpoError
from rewards import resolve

ROW = {"question": "q", "answer": "1"}


def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def one_line_error(call, *args) -> str:
    with pytest.raises(GrpoError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "name, content, kwargs, message",
    [
        # the file's text
        ("latin1.jsonl", lines(ROW).encode() + b'{"question": "caf\xe9", "answer": "2"}\n', {},
         r"latin1.jsonl line 2 is not UTF-8 text \(byte 0xe9 at column 18\): save the file as UTF-8"),
        ("latin1.csv", b"question,answer\ncaf\xe9,1\n", {}, r"latin1.csv line 2 is not UTF-8 text"),
        ("blank.jsonl", "\n  \n\n", {}, r"blank.jsonl holds no rows: give a file with at least one example"),
        # rows that are not objects
        ("list.jsonl", lines(ROW, [1, 2]), {},
         r'list.jsonl line 2 is a list, not a JSON object: write each row as \{"question": ..., "answer": ...\}'),
        ("scalar.jsonl", lines("7"), {}, r"scalar.jsonl line 1 is a number, not a JSON object"),
        ("bad.jsonl", lines(ROW, '{"question": oops}'), {},
         r"bad.jsonl line 2 is not valid JSON \(Expecting value at column 14\): fix or remove that line"),
        ("number.json", "5", {}, r"number.json holds a number: give a list of rows"),
        ("keyed.json", json.dumps({"rows": [ROW]}), {},
         r"keyed.json holds its rows under 'rows': put them under \"data\""),
        ("items.json", json.dumps([ROW, "q2"]), {}, r"items.json row 2 is a string, not a JSON object"),
        # values
        ("null.jsonl", lines(ROW, {"question": "q2", "answer": None}), {},
         r"null.jsonl row 2 has no 'answer' \(null\): fill it in or remove the row"),
        ("short.jsonl", lines(ROW, {"question": "q2"}), {}, r"short.jsonl row 2 has no 'answer' \(null\)"),
        ("nested.jsonl", lines({"question": {"text": "q"}, "answer": "1"}), {},
         r"nested.jsonl row 1: 'question' is an object, not text: give it as a string"),
        ("listed.jsonl", lines({"question": "q", "answer": [1, 2]}), {}, r"row 1: 'answer' is a list, not text"),
        ("empty.jsonl", lines({"question": "q", "answer": " "}), {}, r"row 1: 'answer' is empty: fill it in"),
        ("cell.csv", "question,answer\nq,\n", {}, r"cell.csv row 1: 'answer' is empty"),
        ("hashes.jsonl", lines({"question": "q", "answer": "work\n#### "}), {},
         r"row 1: nothing follows '####' in 'answer': write the final answer after it"),
        ("chat.jsonl", lines({"prompt": [{"role": "user", "content": "hi"}], "answer": "1"},
                             {"prompt": "hi", "answer": "2"}), {},
         r"chat.jsonl row 2: 'prompt' is not a list of chat messages: give \[\{\"role\": \"user\""),
        # CSV shape
        ("header.csv", "question,answer\n", {}, r"header.csv has a header and no rows: add one row per example"),
        ("ragged.csv", "question,answer\nq,1\nWhat is 1,000 + 1?,1001\n", {},
         r"ragged.csv line 3 has 3 fields and the header 2: quote the fields that hold commas"),
        ("quote.csv", 'question,answer\nq,1\n"What is 2+2?,4\n', {},
         r"quote.csv: a quote \(\"\) opened on line 3 is never closed"),
        ("semicolon.csv", "question;answer\nq;1\n", {},
         r"field 'question' is not in the data \(fields: question;answer\): the file looks separated by ';'"),
        # not the format its name says
        ("text.parquet", "hello", {},
         r"text.parquet could not be read as parquet .*: check that the file really is parquet"),
        # flags
        ("limit.jsonl", lines(ROW), {"limit": 0}, r"limit must be a positive number of examples, got 0: drop --limit"),
        ("negative.jsonl", lines(ROW, ROW), {"limit": -1}, r"got -1"),
    ],
)  # fmt: skip
def test_bad_data_is_one_line_that_names_the_row(tmp_path, name, content, kwargs, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert re.search(message, one_line_error(load_examples, DataSettings(dataset=str(path), **kwargs)))


def test_bad_data_in_folders_and_globs(tmp_path):
    (tmp_path / "hub" / "data").mkdir(parents=True)
    (tmp_path / "hub" / "data" / "train.jsonl").write_text(lines(ROW, '{"question": oops}'))
    message = one_line_error(load_examples, DataSettings(dataset=str(tmp_path / "hub")))
    assert "train.jsonl line 2 is not valid JSON" in message

    (tmp_path / "parts.jsonl").mkdir()
    message = one_line_error(load_examples, DataSettings(dataset=str(tmp_path / "part*")))
    assert "matches only folders" in message

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{}")
    message = one_line_error(load_examples, DataSettings(dataset=str(tmp_path / "broken")))
    assert "looks written by save_to_disk but does not load" in message and message.endswith("save it again")


@pytest.mark.parametrize(
    "name, content, answers",
    [
        ("floats.jsonl", lines({"question": "q", "answer": 1}, {"question": "q", "answer": 2.5}), ["1", "2.5"]),
        ("written.csv", "question,answer\nq,007\nq,NA\nq,1.0\n", ["007", "NA", "1.0"]),
    ],
)
def test_answers_are_read_as_written(tmp_path, name, content, answers):
    (tmp_path / name).write_text(content)
    assert [e["answer"] for e in load_examples(DataSettings(dataset=str(tmp_path / name)))] == answers


def test_eval_never_takes_the_training_data_for_a_split(tmp_path):
    from datasets import Dataset

    saved = tmp_path / "saved"  # one Dataset: no test split, though it reads whole for any split
    Dataset.from_list([{"question": f"q{i}", "answer": str(i)} for i in range(20)]).save_to_disk(saved)
    train = load_examples(DataSettings(dataset=str(saved)))
    held, kept, described = eval_examples(DataSettings(dataset=str(saved)), train, limit=2, seed=0)
    assert described.startswith("2 prompts held out") and len(kept) == 18

    data = tmp_path / "d.jsonl"
    data.write_text(lines(ROW))
    message = one_line_error(eval_examples, DataSettings(dataset=str(data), eval_split="test"), train, 2, 0)
    assert message.endswith("has no splits: give the evaluation data as --eval-dataset instead")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text(lines(ROW))
    message = one_line_error(eval_examples, DataSettings(dataset=str(tmp_path / "hub"), eval_split="dev"), train, 2, 0)
    assert "has no split 'dev' (splits: train): use --eval-split NAME" in message


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"recipe .*r.yaml is a folder: give the path of a YAML file"),
        ("- max_steps: 3\n", r"holds a list: write one `setting: value` a line"),
        ("5\n", r"holds the single value 5: write one `setting: value` a line"),
        ("max_steps: 3\n  beta: [\n", r"is not valid YAML \(mapping values are not allowed here at line 2, column 7\)"),
        (b"system_prompt: caf\xe9\n", r"r.yaml line 1 is not UTF-8 text: save the file as UTF-8"),
        ("1: 2\n", r"1 is no setting name"),
        ("max_steps: ten\n", r"max_steps must be an integer, got 'ten': change that line"),
        ("learning_rate: abc\n", r"learning_rate must be a number, got 'abc'"),
        ("num_generations: 2.5\n", r"num_generations must be an integer, got 2.5"),
        ("lora_rank: true\n", r"lora_rank must be an integer, got True"),
        ("limit: all\n", r"limit must be an integer or null, got 'all'"),
        ("rewards: correctness\n", r"rewards must be a list of text .*: write it as a list, rewards: \[correctness\]"),
        ("target_modules: 5\n", r"target_modules must be a list of text"),
        ("system_prompt: 5\n", r"system_prompt must be text, got 5"),
    ],
)
def test_bad_recipe_is_one_line(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert re.search(message, one_line_error(read_recipe, str(path)))


def test_a_recipe_reads_exponents_without_a_dot_as_numbers(tmp_path):
    (tmp_path / "r.yaml").write_text("learning_rate: 5e-6\nadam_epsilon: 1e-8\nsystem_prompt: 1e5\n")
    assert read_recipe(str(tmp_path / "r.yaml")) == {
        "learning_rate": 5e-6,
        "adam_epsilon": 1e-8,
        "system_prompt": "1e5",
    }


@pytest.mark.parametrize(
    "files, spec, message",
    [
        ({"loud.py": "raise ValueError('first\\nsecond')\n"}, "loud.py:f",
         r"reward file loud.py failed to import \(ValueError: first\): fix it and retry$"),
        ({"quits.py": "raise SystemExit(3)\n"}, "quits.py:f",
         r"reward file quits.py failed to import \(SystemExit: 3\)"),
        ({"folder.py/x": ""}, "folder.py:f", r"reward file folder.py is a folder: give path/to/file.py:function"),
        ({"mine.py": "def brevity(completions, **kw): ...\n"}, "mine.py:brevty",
         r"mine.py has no 'brevty': did you mean brevity\?"),
        ({"mine.py": "def f(completions, **kw): ...\n"}, "mine.py:", r"names no function: give module:function"),
        ({}, "correctness:abc",
         r"reward correctness:abc: the weight 'abc' is not a number: give NAME:WEIGHT, as correctness:0\.5"),
        ({}, "correctness:nan", r"the weight nan is not a finite number"),
    ],
)  # fmt: skip
def test_bad_reward_spec_is_one_line(tmp_path, monkeypatch, files, spec, message):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    assert re.search(message, one_line_error(resolve, spec))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "latin1.jsonl"], "error: latin1.jsonl line 1 is not UTF-8 text (byte 0xe9 at column 18)"),
        (["--config", "recipes"], "error: recipe recipes is a folder: give the path of a YAML file (r.yaml)"),
    ],
)
def test_the_command_says_it_in_one_line_and_exits_2(tmp_path, args, message):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "2"}\n')
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("max_steps: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "grpo_cli", "train", "--dry-run", *args, "--output-dir", "out"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr[-300:]
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
