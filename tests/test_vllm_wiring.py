"""The vLLM path through Unsloth, wired against fakes so it is tested without a GPU."""

import sys
import types
from pathlib import Path

import pytest
import torch

from grpo_cli import models
from grpo_cli.config import ModelSettings
from grpo_cli.generate import Sampling, generate_vllm


class FakeVllmModel:
    """Unsloth's fast_inference model: fast_generate and load_lora."""

    def __init__(self):
        self.calls = []

    def load_lora(self, path):
        return ("lora-request", path)

    def fast_generate(self, texts, sampling_params=None, lora_request=None):
        self.calls.append((texts, sampling_params, lora_request))
        tag = "tuned" if lora_request else "base"
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"{tag}:{t}")]) for t in texts]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_fast_generate_gets_the_adapter_as_a_lora_request(fake_vllm):
    model = FakeVllmModel()
    sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=1024, seed=7)
    assert generate_vllm(model, ["q"], sampling, None) == ["base:q"]
    assert generate_vllm(model, ["q"], sampling, Path("lora")) == ["tuned:q"]
    (_, base_params, base_lora), (_, params, lora) = model.calls
    assert base_lora is None and lora == ("lora-request", "lora")
    assert params == {"temperature": 0.8, "top_p": 0.95, "max_tokens": 1024, "seed": 7}


def test_greedy_is_temperature_zero(fake_vllm):
    model = FakeVllmModel()
    generate_vllm(model, ["q"], Sampling(greedy=True, max_tokens=16), None)
    assert model.calls[0][1]["temperature"] == 0.0


@pytest.fixture
def fake_unsloth(monkeypatch, tmp_path):
    """A fake unsloth whose from_pretrained records its arguments; returns them and a model dir."""
    seen = {}

    def from_pretrained(**kwargs):
        seen.update(kwargs)
        model = types.SimpleNamespace(
            config=types.SimpleNamespace(_attn_implementation="sdpa"),
            dtype=torch.float32,
            get_output_embeddings=lambda: torch.nn.Linear(2, 2),
        )
        return model, types.SimpleNamespace(pad_token=None, eos_token="</s>")

    module = types.SimpleNamespace(FastLanguageModel=types.SimpleNamespace(from_pretrained=from_pretrained))
    monkeypatch.setitem(sys.modules, "unsloth", module)
    (tmp_path / "config.json").write_text("{}")
    return seen, str(tmp_path), module


@pytest.mark.parametrize("has_vllm, expected", [(True, True), (False, False)])
def test_cuda_load_asks_unsloth_for_vllm(monkeypatch, fake_unsloth, has_vllm, expected):
    seen, path, _ = fake_unsloth
    monkeypatch.setattr(models, "cuda_available", lambda: True)
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: (has_vllm or None) if name == "vllm" else real_find_spec(name)
    )
    settings = ModelSettings(model=path, lora_rank=32, gpu_memory_utilization=0.5)  # 4-bit: auto
    models.load_model(settings)
    assert seen["fast_inference"] is expected and seen["gpu_memory_utilization"] == 0.5
    assert seen["load_in_4bit"] is True and seen["max_lora_rank"] == 32
    assert models.generation_backend(settings) == (
        "Unsloth GPU + vLLM" if expected else "Unsloth GPU + transformers generate"
    )


def test_cpu_load_does_not_ask_for_vllm(monkeypatch, fake_unsloth):
    seen, path, _ = fake_unsloth
    monkeypatch.setattr(models, "cuda_available", lambda: False)
    _, tokenizer = models.load_model(ModelSettings(model=path))
    assert "fast_inference" not in seen and tokenizer.pad_token == "</s>"
    assert seen["load_in_4bit"] is False  # 16-bit is faster on CPU; a recipe can force 4-bit
    models.load_model(ModelSettings(model=path, load_in_4bit=True))
    assert seen["load_in_4bit"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_two_grpo_steps_save_and_infer(tmp_path):
    import subprocess

    out = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "grpo_cli", "train", "--max-steps", "2", "--num-generations", "4", "--batch-size", "4",
         "--max-completion-length", "32", "--lora-rank", "8", "--reward", "answer_tag", "--output-dir", str(out)],
        check=True,
    )  # fmt: skip
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    subprocess.run([sys.executable, "-m", "grpo_cli", "infer", "--lora", str(out / "adapter"), "--prompt", "2+2?",
                    "--max-tokens", "16"], check=True)  # fmt: skip


@pytest.mark.vllm
@pytest.mark.skipif(
    not __import__("torch").cuda.is_available() or __import__("importlib").util.find_spec("vllm") is None,
    reason="needs CUDA and vLLM",
)
def test_vllm_backend_is_chosen():
    assert models.use_vllm(ModelSettings())


def test_standby_is_set_before_unsloth_is_imported(monkeypatch, fake_unsloth):
    import builtins
    import os

    _, path, module = fake_unsloth
    monkeypatch.delenv("UNSLOTH_VLLM_STANDBY", raising=False)
    seen = {}
    real_import = builtins.__import__

    def spy(name, *args, **kwargs):
        if name == "unsloth":
            seen["standby"] = os.environ.get("UNSLOTH_VLLM_STANDBY")
            return module
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy)
    monkeypatch.setattr(models, "cuda_available", lambda: False)
    models.load_model(ModelSettings(model=path, vllm_standby=True))
    assert seen["standby"] == "1"
