"""Computing each prompt once for its group must give TRL's own log-probs, entropies and gradients."""

import importlib.util
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from grpo_cli.cpu_speed import shared_prompt_logps

BENCH = Path(__file__).resolve().parents[1] / "bench" / "grpo_bench.py"


@pytest.fixture
def fused_lora_llama(monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer import grpo_trainer, utils

    if utils._ChunkedLogProbFunction is None:  # TRL's needs Triton: the benchmark's pure-torch stand-in
        spec = importlib.util.spec_from_file_location("grpo_bench", BENCH)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        monkeypatch.setattr(utils, "_ChunkedLogProbFunction", bench.torch_chunked_logprob())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    grpo_trainer.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    return model


def batch():
    """Two prompts (one left-padded) x 3 completions of up to 4 tokens (some right-padded), as TRL lays them out."""
    prompts = [([0, 0, 11, 12, 13], [0, 0, 1, 1, 1]), ([21, 22, 23, 24, 25], [1, 1, 1, 1, 1])]
    ids, mask = [], []
    for p_ids, p_mask in prompts:
        for length in (4, 2, 3):
            completion = torch.randint(1, 64, (4,)).tolist()
            ids.append(p_ids + completion)
            mask.append(p_mask + [1] * length + [0] * (4 - length))
    return torch.tensor(ids), torch.tensor(mask)


def test_shared_prompt_matches_trl_forward_and_gradients(fused_lora_llama):
    from trl import GRPOTrainer

    model = fused_lora_llama
    input_ids, attention_mask = batch()
    completion_mask = attention_mask[:, -4:].bool()
    trl_self = types.SimpleNamespace(accelerator=types.SimpleNamespace(autocast=nullcontext, is_main_process=True))
    results = []
    for compute in (
        lambda: GRPOTrainer._get_per_token_logps_and_entropies(
            trl_self, model, input_ids, attention_mask, 4, compute_entropy=True
        )[:2],
        lambda: shared_prompt_logps(model, input_ids, attention_mask, 4, compute_entropy=True),
    ):
        model.zero_grad()
        logps, entropy = compute()
        (logps * completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logps.detach(), entropy.detach(), grads))
    (logps, entropy, grads), (shared_logps, shared_entropy, shared_grads) = results
    assert shared_logps.shape == logps.shape == (6, 4)
    assert torch.allclose(shared_logps[completion_mask], logps[completion_mask], atol=1e-5)
    assert torch.allclose(shared_entropy[completion_mask], entropy[completion_mask], atol=1e-5)
    assert grads.keys() == shared_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-5), name


def test_nothing_shared_falls_back(fused_lora_llama):
    input_ids, attention_mask = batch()
    rows = [0, 3]  # one completion of each prompt: no prompt repeats
    assert shared_prompt_logps(fused_lora_llama, input_ids[rows], attention_mask[rows], 4, False) is None
