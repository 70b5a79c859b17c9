import json
from pathlib import Path

import pytest

from tests.fakes import fake_unsloth, fake_vllm, on_gpu  # noqa: F401  (fixtures)

SHARED_GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "gsm8k"


class FakeTokenizer:
    """Counts one token per whitespace-separated word of the chat-formatted prompt (and of the tools' names, as a
    tool template lists them)."""

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, tokenize=True, return_dict=False):
        text = " ".join(f"<tool> {t.__name__}" for t in tools or []) + " "
        text += " ".join(f"<{m['role']}> {m['content']}" for m in messages) + (
            " <assistant>" if add_generation_prompt else ""
        )
        return text.split() if tokenize else text


@pytest.fixture
def fake_tokenizer():
    return FakeTokenizer()


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write
