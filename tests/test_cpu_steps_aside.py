"""Where a CPU speed path cannot share a prompt's cache (hybrid models, generation settings that expand rows or build
their own cache), it steps aside with one line and the result is what the plain path gives."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from grpo_cli import cpu_speed
from grpo_cli.cpu_speed import cache_shareable, prefix_once, prompts_prefilled_once, shared_prompt_logps

BENCH = Path(__file__).resolve().parents[1] / "bench" / "grpo_bench.py"
GREEDY = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(autouse=True)
def nothing_said_yet(monkeypatch):
    monkeypatch.setattr(cpu_speed, "_stepped_aside", set())


def tiny_qwen3_5_config(**extra):
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, max_position_embeddings=64, layer_types=["linear_attention", "full_attention"],
        **extra,
    )  # fmt: skip


@pytest.fixture
def tiny_hybrid():
    """Qwen3.5's text model: a gated delta-net (linear attention) layer, then a full-attention one."""
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(0)
    return Qwen3_5ForCausalLM(tiny_qwen3_5_config(pad_token_id=0, eos_token_id=1)).eval()


@pytest.fixture
def tiny_llama():
    from tests.fakes import tiny_llama

    return tiny_llama().eval()


def repeated_prompts():
    """Two prompts (the first left-padded), each 3 times in a row, as TRL lays out a group of G = 3."""
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (2, 9))
    ids[0, :3] = 0
    mask = (ids != 0).long()
    return ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)


def said(capsys, start: str) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(start)]


def test_the_rule_is_the_cache_layers_transformers_builds():
    """Only layers that keep keys and values alone share; a hybrid layer inherits batch_select_indices from
    DynamicLayer yet would leave its recurrent state behind, so having the method is not enough."""
    from transformers import DynamicCache, LlamaConfig, NemotronHConfig, Qwen3NextConfig, cache_utils

    def model(config):
        return SimpleNamespace(config=config)

    assert cache_shareable(model(LlamaConfig(num_hidden_layers=2))) is None
    assert cache_shareable(model(LlamaConfig(num_hidden_layers=2, sliding_window=8))) is None
    hybrid = cache_utils.LinearAttentionAndFullAttentionLayer
    assert hasattr(hybrid, "batch_select_indices") and hasattr(hybrid, "batch_repeat_interleave")
    for config in (
        tiny_qwen3_5_config(),
        Qwen3NextConfig(num_hidden_layers=4),
        NemotronHConfig(),
        LlamaConfig(num_hidden_layers=2, layer_types=["hybrid", "full_attention"]),
    ):
        assert "keep more than keys and values" in cache_shareable(model(config)), type(config).__name__
    # the cache a prefill returned is judged as well: a model may build its own
    assert cache_shareable(None, DynamicCache(config=LlamaConfig(num_hidden_layers=2))) is None
    built = DynamicCache(config=LlamaConfig(num_hidden_layers=2, layer_types=["hybrid", "full_attention"]))
    assert "LinearAttentionAndFullAttentionLayer" in cache_shareable(None, built)
    own = type("OwnCache", (DynamicCache,), {})()
    assert cache_shareable(None, own) == "its OwnCache is not a DynamicCache of keys and values"


def test_a_hybrid_model_generates_as_plain_generate_does(tiny_hybrid, capsys):
    ids, mask = repeated_prompts()
    plain = tiny_hybrid.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    calls = []
    tiny_hybrid.register_forward_pre_hook(
        lambda module, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    with prompts_prefilled_once(tiny_hybrid):
        shared = tiny_hybrid.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        again = tiny_hybrid.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(shared, plain) and torch.equal(again, plain)
    assert calls[0] == ids.shape  # no prefill of the distinct prompts: generate's own first forward, on every row
    assert said(capsys, "CPU:") == [
        "CPU: each repeated prompt is prefilled row by row, as in TRL: "
        "its linear_attention layers keep more than keys and values (LinearAttentionLayer)"
    ]  # once, not at every call


def test_a_hybrid_model_pads_a_common_opening_as_plain_generate_does(tiny_hybrid, capsys):
    torch.manual_seed(2)
    opening = torch.randint(3, 64, (20,)).tolist()
    tokens = [opening + torch.randint(3, 64, (n,)).tolist() for n in (3, 7, 5)]
    width = max(map(len, tokens))
    ids = torch.tensor([[0] * (width - len(t)) + t for t in tokens])  # plain left padding
    with torch.no_grad():
        plain = tiny_hybrid.generate(input_ids=ids, attention_mask=(ids != 0).long(), **GREEDY)
        batch = prefix_once(tiny_hybrid, tokens, pad=0)
        assert "past_key_values" not in batch and torch.equal(batch["input_ids"], ids)
        shared = tiny_hybrid.generate(**batch, **GREEDY)
        prefix_once(tiny_hybrid, tokens, pad=0)
    assert torch.equal(shared, plain)
    assert said(capsys, "CPU:") == [
        "CPU: the prompts' common opening is prefilled row by row, as plain generate does: "
        "its linear_attention layers keep more than keys and values (LinearAttentionLayer)"
    ]


def test_a_hybrid_model_leaves_log_probs_to_trl(tiny_hybrid, capsys):
    """None is the CPU trainer's signal to compute log-probs with TRL's own forward; the trainer test below runs it."""
    ids, mask = repeated_prompts()
    completions = torch.randint(3, 64, (6, 4))
    input_ids, attention_mask = torch.cat([ids, completions], 1), torch.cat([mask, torch.ones_like(completions)], 1)
    calls = []
    tiny_hybrid.register_forward_pre_hook(lambda module, args, kw: calls.append(1), with_kwargs=True)
    assert shared_prompt_logps(tiny_hybrid, input_ids, attention_mask, 4, compute_entropy=True) is None
    assert shared_prompt_logps(tiny_hybrid, input_ids, attention_mask, 4, compute_entropy=True) is None
    assert calls == []  # decided from the config: no prefill thrown away
    assert said(capsys, "CPU:") == [
        "CPU: log-probs run over each prompt and completion in one forward, as in TRL: "
        "its linear_attention layers keep more than keys and values (LinearAttentionLayer)"
    ]


@pytest.mark.parametrize(
    "settings, passed_as, reason",
    [
        (dict(num_return_sequences=2, do_sample=True), "generation_config", "num_return_sequences=2"),
        (dict(num_return_sequences=2, do_sample=True), "kwargs", "num_return_sequences=2"),
        (dict(num_beams=2), "generation_config", "num_beams=2"),
        (dict(num_beams=2), "model", "num_beams=2"),
        (dict(cache_implementation="static"), "generation_config", "cache_implementation='static'"),
        (dict(use_cache=False), "generation_config", "use_cache=False"),
    ],
)  # fmt: skip
def test_generation_settings_that_expand_rows_or_build_a_cache_generate_as_plain(
    tiny_llama, capsys, settings, passed_as, reason
):
    """TRL passes GRPOConfig.generation_kwargs (and cache_implementation) to generate in a GenerationConfig."""
    from transformers import GenerationConfig

    ids, mask = repeated_prompts()
    if passed_as == "generation_config":
        kwargs = dict(generation_config=GenerationConfig(**{**GREEDY, **settings}))
    elif passed_as == "kwargs":
        kwargs = dict(GREEDY, **settings)
    else:
        tiny_llama.generation_config.update(**settings)
        kwargs = dict(GREEDY)
    torch.manual_seed(0)
    plain = tiny_llama.generate(input_ids=ids, attention_mask=mask, **kwargs)
    with prompts_prefilled_once(tiny_llama):
        torch.manual_seed(0)
        shared = tiny_llama.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(shared, plain)
    assert said(capsys, "CPU:") == [
        f"CPU: each repeated prompt is prefilled row by row, as in TRL: "
        f"the generation settings {reason} leave no room for a prefilled cache"
    ]


@pytest.mark.slow
def test_the_cpu_trainer_trains_a_hybrid_model(tiny_hybrid, tmp_path, monkeypatch, capsys):
    """One GRPO step of grpo's CPU trainer on a hybrid model, with the plan a CPU machine gets."""
    from datasets import Dataset
    from trl import GRPOConfig

    from grpo_cli.config import Settings
    from grpo_cli.plan import Machine, resolve
    from grpo_cli.trainer import trainer_class
    from tests.fakes import torch_logprob, word_tokenizer

    torch_logprob(monkeypatch)
    tokenizer = word_tokenizer()
    plan = resolve(Settings(), Machine())
    assert plan.cpu_paths
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, learning_rate=1e-2, gradient_checkpointing=False, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip

    def spread(completions, **kwargs):
        return [float(sum(map(ord, c)) % 7) for c in completions]

    data = Dataset.from_dict({"prompt": ["w3 w4 w5", "w6 w7 w8 w9"]})
    trainer = trainer_class(plan)(
        model=tiny_hybrid, reward_funcs=spread, args=args, train_dataset=data, processing_class=tokenizer
    )
    before = {n: p.detach().clone() for n, p in tiny_hybrid.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in tiny_hybrid.named_parameters())
    lines = said(capsys, "CPU:")
    assert len(lines) == 2 and "each repeated prompt" in lines[0] and "log-probs" in lines[1]
