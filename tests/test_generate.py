"""The CPU generation speed-ups must not change what is generated: same function, same distribution."""

import pytest
import torch

from grpo_cli.generate import fast_sampling, merged_lora
from grpo_cli.models import fp32_cpu_attention


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config).to(torch.bfloat16)


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


def test_fp32_cpu_attention_matches_sdpa_forward_and_backward(tiny_llama):
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as in generation
    outputs = {}
    for implementation in ("sdpa", fp32_cpu_attention()):
        tiny_llama.set_attn_implementation(implementation)
        tiny_llama.zero_grad()
        logits = tiny_llama(ids, attention_mask=mask).logits.float()
        logits[1].logsumexp(-1).sum().backward()
        outputs[implementation] = logits.detach(), tiny_llama.model.layers[0].self_attn.q_proj.weight.grad.float()
    (logits, grad), (logits32, grad32) = outputs.values()
    assert torch.allclose(logits[1], logits32[1], atol=0.05) and torch.allclose(
        logits[0, 3:], logits32[0, 3:], atol=0.05
    )
    assert torch.allclose(grad, grad32, atol=0.05 * grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_are_the_same_function_with_the_fold_and_put_forward_back(lora_model, dtype, monkeypatch):
    from grpo_cli.cpu import _packs
    from grpo_cli.generate import cpu_generation

    monkeypatch.setenv("GRPO_PACKED_LINEAR", "1")  # packed where oneDNN can, whatever this machine measures
    model = lora_model.to(dtype)
    ids = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        unmerged = model(ids).logits.float()
        with cpu_generation(model, rows=3):
            assert ("forward" in vars(model.base_model.model.lm_head)) == _packs(dtype)  # bf16 needs AVX-512
            packed = model(ids).logits.float()
    assert torch.allclose(packed, unmerged, atol=1e-4 if dtype == torch.float32 else 0.05)
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits.float(), unmerged)


def test_the_packed_choice_is_measured_once_and_cached(tmp_path, monkeypatch, capsys):
    from grpo_cli import cpu

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
def test_the_dtype_line_is_true_on_each_kind(monkeypatch, flags, kind, dtype):
    """Unsloth picks the CPU dtype from the CPU's flags; the line grpo prints must name that dtype and the right
    reason for the same flags."""
    import unsloth  # noqa: F401  (unsloth_zoo needs it first)
    from unsloth_zoo.cpu import loader, runtime

    from grpo_cli import cpu
    from grpo_cli.models import cpu_precision_line

    monkeypatch.delenv("UNSLOTH_CPU_BF16", raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    runtime.cpu_bf16_supported.cache_clear()  # Unsloth caches its answer
    monkeypatch.setattr(loader, "cpu_bf16_supported", runtime.cpu_bf16_supported.__wrapped__)
    monkeypatch.setattr(cpu, "flags", lambda: flags)
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    chosen = loader._resolve_dtype(None)  # what FastLanguageModel.from_pretrained loads on CPU
    assert str(chosen) == f"torch.{dtype}"
    native = "computes bf16 natively" if dtype == "bfloat16" else "has no native bf16"
    assert cpu_precision_line(chosen).startswith(f"CPU ({kind}): {dtype} weights, as this CPU {native}")
