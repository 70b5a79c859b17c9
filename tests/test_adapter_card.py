"""The adapter documents itself (a Hub model card) and goes to the Hub in one piece, or says why not."""

import json

import pytest
from huggingface_hub import ModelCard

from grpo_cli.adapter import save_lora
from grpo_cli.errors import GrpoError


@pytest.fixture
def run(tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    manifest = {
        "base_model": "smollm2-135m", "system_prompt": "Answer with <answer>N</answer>.", "step": 30,
        "last_reward": 1.875, "rewards": ["answer_tag", "numeric_correctness:2"],
        "settings": {"model": {"lora_rank": 16}, "data": {"dataset": "arithmetic"}, "train": {"max_steps": 30}},
    }  # fmt: skip
    (adapter / "grpo.json").write_text(json.dumps(manifest))
    return adapter.parent


def test_save_lora_writes_a_model_card_the_hub_reads(run, tmp_path):
    out = save_lora(run, tmp_path / "lora")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.library_name == "peft"
    assert {"grpo", "trl", "unsloth"} <= set(card.data.tags)
    assert "| `numeric_correctness` | 2 |" in card.text and "Answer with <answer>N</answer>." in card.text
    assert "for 30 steps; mean reward at the last step: 1.875" in card.text
    assert 'LoRARequest("adapter", 1, "ADAPTER_DIR")' in card.text and "max_lora_rank=16" in card.text


def test_push_without_the_hub_says_so_and_keeps_the_folder(run, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GrpoError, match=r"--push-to-hub me/adapter: the hub is offline here .*: upload it later with"):
        save_lora(run, tmp_path / "lora", push_to_hub="me/adapter")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "grpo.json"
    ]  # fmt: skip
    with pytest.raises(GrpoError, match="give a Hub repository as ORG/NAME"):
        save_lora(run, tmp_path / "other", push_to_hub="not a repo")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("force", [False, True])
def test_an_out_dir_that_is_a_file_is_refused_and_kept(run, tmp_path, force):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(GrpoError, match="notes.txt is a file, not a directory"):
        save_lora(run, mine, force=force)
    assert mine.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]


def test_an_out_dir_inside_a_file_is_refused_before_anything_is_written(run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(GrpoError, match="notes.txt is a file: give a directory in a folder you can write to"):
        save_lora(run, tmp_path / "notes.txt" / "out")
    assert (tmp_path / "notes.txt").read_text() == "mine"
