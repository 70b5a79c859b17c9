"""The CPU generation speed-ups must not change what is generated: same function, same distribution."""

import pytest
import torch

from grpo_cli.cpu_speed import fast_sampling, merged_lora
from grpo_cli.models import cpu_attention


@pytest.fixture
def tiny_llama():
    from tests.fakes import tiny_llama

    return tiny_llama().to(torch.bfloat16)


@pytest.fixture
def lora_model(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # trained: B is no longer zero
    return model.eval()


def test_merged_lora_is_the_same_function_and_puts_the_weights_back(lora_model):
    ids = torch.randint(0, 64, (2, 10))
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    with torch.no_grad():
        unmerged = lora_model(ids).logits.float()
        with lora_model.disable_adapter():
            base = lora_model(ids).logits.float()
        with merged_lora(lora_model):
            merged = lora_model(ids).logits.float()
    assert (unmerged - base).abs().max() > 0.1  # the adapter matters here
    assert torch.allclose(merged, unmerged, atol=0.05)
    for name, param in lora_model.named_parameters():
        assert torch.equal(param, before[name]), name  # bit for bit: no merge/unmerge drift
    assert not any(getattr(m, "merged", False) for m in lora_model.modules())


def test_merged_lora_leaves_a_disabled_adapter_alone(lora_model):
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad(), lora_model.disable_adapter():
        base = lora_model(ids).logits
        with merged_lora(lora_model):
            assert torch.equal(lora_model(ids).logits, base)


def test_fast_sampling_draws_from_the_distribution_and_restores_multinomial():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]])
    original = torch.multinomial
    torch.manual_seed(0)
    with fast_sampling():
        assert torch.multinomial is not original
        draws = torch.cat([torch.multinomial(probs, num_samples=1) for _ in range(20000)], dim=1)
        assert torch.multinomial(probs, 2).shape == (2, 2)  # anything else goes to torch's own
    assert torch.multinomial is original
    frequencies = torch.stack([(draws[0] == i).float().mean() for i in range(4)])
    assert torch.allclose(frequencies, probs[0], atol=0.01)
    assert (draws[1] == 3).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_matches_sdpa_forward_and_backward(tiny_llama, dtype):
    tiny_llama.to(dtype)
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as in generation
    outputs = {}
    for implementation in ("sdpa", cpu_attention()):
        tiny_llama.set_attn_implementation(implementation)
        tiny_llama.zero_grad()
        logits = tiny_llama(ids, attention_mask=mask).logits.float()
        logits[1].logsumexp(-1).sum().backward()
        outputs[implementation] = logits.detach(), tiny_llama.model.layers[0].self_attn.q_proj.weight.grad.float()
    (logits, grad), (logits32, grad32) = outputs.values()
    tol = 1e-4 if dtype == torch.float32 else 0.05  # bf16: sdpa computes in bf16, ours in fp32
    assert torch.allclose(logits[1], logits32[1], atol=tol) and torch.allclose(logits[0, 3:], logits32[0, 3:], atol=tol)
    assert torch.allclose(grad, grad32, atol=tol * grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_are_the_same_function_with_the_fold_and_put_forward_back(lora_model, dtype, monkeypatch):
    from grpo_cli.cpu import packs
    from grpo_cli.cpu_speed import cpu_generation

    monkeypatch.setenv("GRPO_PACKED_LINEAR", "1")  # packed where oneDNN can, whatever this machine measures
    model = lora_model.to(dtype)
    ids = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        unmerged = model(ids).logits.float()
        with cpu_generation(model, rows=3):
            assert ("forward" in vars(model.base_model.model.lm_head)) == packs(dtype)  # bf16 needs AVX-512
            packed = model(ids).logits.float()
    assert torch.allclose(packed, unmerged, atol=1e-4 if dtype == torch.float32 else 0.05)
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad(), model.disable_adapter():  # the base model, packed, is the base model
        base = model(ids).logits.float()
        with cpu_generation(model, rows=3):
            assert torch.allclose(model(ids).logits.float(), base, atol=1e-4 if dtype == torch.float32 else 0.05)
    with torch.no_grad():
        assert torch.equal(model(ids).logits.float(), unmerged)


def test_the_packed_choice_is_measured_once_and_cached(tmp_path, monkeypatch, capsys):
    from grpo_cli import cpu

    if not cpu.packs(torch.float32):
        pytest.skip("oneDNN does not pack here: nothing to measure")
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))
    monkeypatch.delenv("GRPO_PACKED_LINEAR", raising=False)
    weights = [torch.randn(96, 64), torch.randn(64, 96)]
    first = cpu.packed_linear_faster(weights, rows=4)
    assert "generation at batch 4 uses" in capsys.readouterr().out
    assert cpu.packed_linear_faster(weights, rows=4) == first and capsys.readouterr().out == ""  # from the cache
    monkeypatch.setenv("GRPO_PACKED_LINEAR", "0")
    assert cpu.packed_linear_faster(weights, rows=4) is False


@pytest.mark.parametrize(
    "flags, kind, dtype",
    [({"avx2", "fma"}, "avx2", "float32"), ({"avx2", "avx512f", "avx512bw"}, "avx512", "float32"),
     ({"avx512f", "avx512_bf16"}, "avx512_bf16", "bfloat16"), ({"avx512f", "amx_bf16", "amx_tile"}, "amx", "bfloat16")],
)  # fmt: skip
def test_the_plan_loads_the_dtype_unsloth_loads_on_each_kind(monkeypatch, flags, kind, dtype):
    """Unsloth picks the CPU dtype from the CPU's flags; the plan must name that dtype, and the right reason, for
    the same flags."""
    import unsloth  # noqa: F401  (unsloth_zoo needs it first)
    from unsloth_zoo.cpu import loader, runtime

    from grpo_cli import cpu, plan
    from grpo_cli.config import Settings

    monkeypatch.delenv("UNSLOTH_CPU_BF16", raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    runtime.cpu_bf16_supported.cache_clear()  # Unsloth caches its answer
    monkeypatch.setattr(loader, "cpu_bf16_supported", runtime.cpu_bf16_supported.__wrapped__)
    monkeypatch.setattr(cpu, "flags", lambda: flags)
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    chosen = loader._resolve_dtype(None)  # what FastLanguageModel.from_pretrained loads on CPU
    assert str(chosen) == f"torch.{dtype}"
    monkeypatch.setattr(
        plan.Machine, "here", classmethod(lambda cls: cls(cpu_kind=cpu.kind(), cpu_bf16=cpu.bf16_native()))
    )
    resolved = plan.resolve(Settings())
    assert resolved.dtype() == chosen and resolved.cpu_kind == kind
    native = "bf16: this CPU computes it natively" if dtype == "bfloat16" else "fp32: this CPU has no native bf16"
    assert resolved.why == (native,) and f"| {resolved.weights} weights |" in resolved.line()


@pytest.mark.parametrize("sample", [False, True])
def test_repeated_prompts_prefilled_once_give_the_same_tokens(lora_model, sample):
    from grpo_cli.cpu_speed import prompts_prefilled_once

    model = lora_model.to(torch.float32)
    ids = torch.randint(3, 64, (2, 9))
    ids[0, :3] = 0  # left padding on the first prompt
    mask = (ids != 0).long()
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)  # G = 3, as TRL lays them out
    kwargs = dict(max_new_tokens=6, do_sample=sample, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    calls = []
    model.register_forward_pre_hook(lambda module, args, kw: calls.append(len(kw["input_ids"])), with_kwargs=True)
    with prompts_prefilled_once(model):
        torch.manual_seed(0)
        shared = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert calls[0] == 2  # the prefill ran on the 2 distinct prompts, not on 6 rows
    assert torch.equal(shared, plain)
    assert "generate" not in vars(model)
    model.generate = wrapper = lambda **kwargs: None  # a wrapper set before (a profiler's, say) is kept
    with prompts_prefilled_once(model):
        pass
    assert model.generate is wrapper


def test_a_common_opening_runs_once_and_gives_the_same_tokens(lora_model):
    from grpo_cli.cpu_speed import prefix_once

    model = lora_model.to(torch.float32)
    torch.manual_seed(1)
    opening = torch.randint(3, 64, (20,)).tolist()
    tokens = [opening + torch.randint(3, 64, (n,)).tolist() for n in (3, 7, 5)]
    width = max(map(len, tokens))
    ids = torch.tensor([[0] * (width - len(t)) + t for t in tokens])  # plain left padding
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), **kwargs)
        batch = prefix_once(model, tokens, pad=0)
        assert batch["past_key_values"].get_seq_length() == 20  # the opening, once
        shared = model.generate(**batch, **kwargs)
    assert torch.equal(shared[:, -6:], plain[:, -6:])


def test_where_the_plan_has_no_cpu_speed_paths_generation_folds_nothing(lora_model, monkeypatch):
    """On a GPU (here a GPU plan over a CPU model), transformers' generate runs as it is: no second copy of every
    adapted weight with the LoRA folded in, no packing, no prefilled opening. The plan decides, not the tensor."""
    from grpo_cli import cpu_speed
    from grpo_cli.config import Settings
    from grpo_cli.generate import Sampling, TransformersEngine
    from grpo_cli.plan import Machine, resolve
    from tests.fakes import gpu_machine, word_tokenizer

    def refused(*args, **kwargs):
        raise AssertionError("a CPU speed path ran where the plan has none")

    gpu = resolve(Settings(), gpu_machine(vllm=False), training=False)
    assert not gpu.cpu_paths and resolve(Settings(), Machine(), training=False).cpu_paths
    for name in ("cpu_generation", "merged_lora", "packed_linears", "prefix_once", "fast_sampling"):
        monkeypatch.setattr(cpu_speed, name, refused)
    engine = TransformersEngine(lora_model, word_tokenizer(), None, gpu)
    texts = ["w3 w4 w5", "w6 w7"]
    outputs = engine.generate(texts, Sampling(greedy=True, max_tokens=4), adapter=True)
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)


def test_the_cpu_modules_import_no_model_plan_or_engine():
    """cpu.py measures the machine and cpu_speed.py holds the speed paths: neither reaches back into the loading,
    the plan or the engines (the old circle cpu -> models -> plan -> cpu)."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "grpo_cli"
    for name in ("cpu.py", "cpu_speed.py"):
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(ast.parse((root / name).read_text()))
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        assert not imported & {"grpo_cli.models", "grpo_cli.plan", "grpo_cli.generate"}, name
