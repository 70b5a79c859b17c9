"""Fakes of Unsloth and vLLM for the tests that cannot run the real ones here, each held to the real API: Unsloth's
by reading its installed source (tests/real_api.py, checked in test_gpu_path.py), vLLM's against the real classes
in test_vllm.py (`make test-vllm`). Importing this module imports neither unsloth nor vllm."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from grpo_cli.plan import Machine
from tests.real_api import compiled, parameters

ENGINE_NAMES = {"vllm_engine", "fast_generate", "fast_generate_batches", "load_lora", "save_lora"}


class FakeEngine:
    """vLLM's LLM as Unsloth keeps it on the model; ``generate`` has LLM.generate's parameters (test_vllm.py)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,
                 tokenization_kwargs=None, mm_processor_kwargs=None):  # fmt: skip
        self.calls.append({"prompts": prompts, "params": sampling_params, "lora_request": lora_request})
        tag = "tuned" if lora_request else "base"
        return [
            types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[types.SimpleNamespace(text=tag)])
            for p in prompts
        ]


class FakeVllmBase:
    """What ``FastLanguageModel.from_pretrained(fast_inference=True)`` returns: Unsloth's engine attributes on a
    plain model, and only those it attaches there (checked against its source below)."""

    def __init__(self, four_bit: bool = False):
        self.vllm_engine = FakeEngine()
        self.fast_generate = self.vllm_engine.generate
        self.fast_generate_batches = None
        self.config = types.SimpleNamespace(_attn_implementation="sdpa", to_dict=lambda: {"hidden_size": 8})
        self.dtype = torch.bfloat16  # a 4-bit load too: Unsloth sets is_loaded_in_4bit only for -bnb-4bit repos
        self.layers = [vllm_4bit_layer() if four_bit else torch.nn.Linear(4, 4)]

    def modules(self):
        return iter(self.layers)

    def get_output_embeddings(self):
        return torch.nn.Linear(2, 2)


def vllm_4bit_layer():
    """A layer as unsloth_zoo's convert_vllm_to_huggingface rebuilds a 4-bit one from vLLM's weights: bitsandbytes'
    Linear4bit whose weight carries the quant state (the source is checked in test_gpu_path.py)."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    layer = Linear4bit(0, 0, bias=False, compute_dtype=torch.bfloat16)
    layer.in_features, layer.out_features = 8, 8
    layer.weight = Params4bit(data=torch.zeros(32, 1, dtype=torch.uint8), requires_grad=False)
    layer.weight.quant_state = types.SimpleNamespace(shape=(8, 8))
    return layer


class Llama3Tokenizer:
    """Like Llama 3's: the chat template writes <|begin_of_text|> (id 1) itself, and so does tokenizing with
    special tokens."""

    bos = 1
    pad_token = eos_token = "<|eot_id|>"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "<|begin_of_text|>" + "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, texts, add_special_tokens=True):
        ids = [[self.bos] + [ord(c) for c in t.removeprefix("<|begin_of_text|>")] for t in texts]
        return {"input_ids": [[self.bos] + i if add_special_tokens else i for i in ids]}


def fake_load_lora(model, save_directory, load_tensors=False, lora_request_id=None):
    return ("lora-request", save_directory)


@pytest.fixture
def fake_unsloth(monkeypatch, tmp_path):
    """A fake unsloth whose from_pretrained and get_peft_model take only the real ones' parameters and record the
    arguments; on "CUDA" with fast_inference it returns a FakeVllmBase."""
    real_load = set(parameters("unsloth.models.loader", "FastLanguageModel.from_pretrained"))
    real_peft = set(parameters("unsloth.models.llama", "FastLlamaModel.get_peft_model"))
    seen = {"loads": []}

    def from_pretrained(**kwargs):
        assert set(kwargs) <= real_load, f"not a parameter of Unsloth's from_pretrained: {set(kwargs) - real_load}"
        seen.update(kwargs)
        seen["loads"].append(kwargs)
        if kwargs.get("fast_inference"):
            return FakeVllmBase(four_bit=kwargs.get("load_in_4bit", False)), Llama3Tokenizer()
        model = types.SimpleNamespace(
            config=types.SimpleNamespace(_attn_implementation="sdpa", to_dict=lambda: {"hidden_size": 8}),
            dtype=torch.float32,
            get_output_embeddings=lambda: torch.nn.Linear(2, 2),
            set_attn_implementation=lambda name: seen.update(attention=name),
            register_forward_pre_hook=lambda hook: seen.update(hook=hook),
            is_loaded_in_4bit=kwargs.get("load_in_4bit", False),
            modules=lambda: iter([]),
        )
        return model, types.SimpleNamespace(pad_token=None, eos_token="</s>")

    def get_peft_model(model, **kwargs):
        assert set(kwargs) <= real_peft, f"not a parameter of Unsloth's get_peft_model: {set(kwargs) - real_peft}"
        seen["peft"] = kwargs
        return model

    fast = types.SimpleNamespace(from_pretrained=from_pretrained, get_peft_model=get_peft_model)
    module = types.SimpleNamespace(FastLanguageModel=fast)
    monkeypatch.setitem(sys.modules, "unsloth", module)
    (tmp_path / "config.json").write_text("{}")
    return seen, str(tmp_path), module


@pytest.fixture
def fake_vllm(monkeypatch):
    """vllm's SamplingParams as a record of its keyword arguments (their names are checked in test_vllm.py), and
    unsloth_zoo's load_lora (its signature is checked against the installed source)."""
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", module)
    zoo = types.ModuleType("unsloth_zoo.vllm_utils")
    zoo.load_lora = fake_load_lora
    monkeypatch.setitem(sys.modules, "unsloth_zoo.vllm_utils", zoo)
    return module


def gpu_machine(**changes) -> Machine:
    """A CUDA machine with bf16 and vLLM, as the plan reads it."""
    return Machine(**{"cuda": True, "cuda_bf16": True, "vllm": True} | changes)


@pytest.fixture
def on_gpu(monkeypatch):
    """grpo's plan believes it runs on CUDA with vLLM installed."""
    monkeypatch.setattr(Machine, "here", classmethod(lambda cls: gpu_machine()))


def adapter_dir(root: Path, rank: int = 8) -> Path:
    """An adapter directory as `grpo save-lora` writes it (the weights' content does not matter here)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": rank, "base_model_name_or_path": "base"}))
    (root / "adapter_model.safetensors").write_bytes(b"")
    settings = {"model": {"lora_rank": rank, "load_in_4bit": None, "max_lora_rank": None}}
    (root / "grpo.json").write_text(json.dumps({"base_model": str(root.parent / "base"), "settings": settings}))
    (root.parent / "base").mkdir(exist_ok=True)
    (root.parent / "base" / "config.json").write_text("{}")
    return root


def unsloth_gguf_export(save_directory, tokenizer=None, quantization_method="fast_quantized"):
    """Unsloth's save_pretrained_gguf as it writes: the merged model into save_directory, the GGUF file into the
    directory its own `_gguf_output_directory` names (a sibling)."""
    merged, gguf_dir = Path(save_directory), Path(compiled("unsloth.save", "_gguf_output_directory")(save_directory))
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")
    gguf_dir.mkdir(parents=True)
    (gguf_dir / f"model.{quantization_method.upper()}.gguf").write_bytes(b"GGUF")


def llama_cpp(folder: Path) -> Path:
    """A llama.cpp folder as Unsloth's check_llama_cpp accepts it: a quantizer that answers --help, a converter."""
    folder.mkdir(parents=True)
    quantize = folder / "llama-quantize"
    quantize.write_text("#!/bin/sh\necho usage\n")
    quantize.chmod(0o755)
    (folder / "convert_hf_to_gguf.py").write_text("")
    return folder


def word_tokenizer():
    """A real tokenizer over 64 words (w2..w63, <pad>, <eos>), for tiny models built from a config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(2, 64)]
    vocab = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w2"))
    vocab.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", eos_token="<eos>")


def torch_logprob(monkeypatch) -> None:
    """TRL's fused log-prob kernel needs Triton; a grpo run has unsloth's patch, a test the bench's pure-torch one."""
    import importlib.util

    from trl.trainer import utils

    if utils._ChunkedLogProbFunction is None:
        spec = importlib.util.spec_from_file_location("grpo_bench", Path(__file__).parents[1] / "bench/grpo_bench.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        monkeypatch.setattr(utils, "_ChunkedLogProbFunction", bench.torch_chunked_logprob())


def tiny_llama(vocab_size: int = 64, pad_token_id: int | None = None):
    """A two-layer Llama of random weights (seeded), built from its config: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa", pad_token_id=pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)
