"""The tool loop on the GPU path, shown from the installed sources: Unsloth's patched GRPOTrainer keeps TRL's tool
loop, which generates each round through the ``_generate_single_turn`` Unsloth patches for its vLLM engine, and
Unsloth's loss applies TRL's ``tool_mask``. grpo's own loop (``converse``, for infer, eval, the dry run and the
held-out evaluation) is held to TRL's here too. The end-to-end test at the bottom runs on a CUDA machine."""

import inspect
import json
import re

import pytest
import torch

from grpo_cli.plan import Machine
from tests.fakes import gpu_machine
from tests.real_api import parameters, source, source_file

CUDA = torch.cuda.is_available()


def trl_source(name: str) -> str:
    from trl import GRPOTrainer

    return inspect.getsource(getattr(GRPOTrainer, name))


def unsloth_grpo_edits() -> set[str]:
    """The GRPOTrainer methods Unsloth's source rewrites (each edit function names the one it applies to)."""
    text = source_file("unsloth.models.rl_replacements").read_text()
    edits = re.findall(r"def (grpo_trainer_\w+)\(function_name, function\):\n\s+if function_name != \"(\w+)\"", text)
    assert edits, "Unsloth's GRPO edit functions are no longer where they were"
    registered = set(re.findall(r'RL_FUNCTIONS\["grpo_trainer"\]\.append\((\w+)\)', text))
    return {method for func, method in edits if func in registered}


def test_trls_generation_runs_the_tool_loop_and_the_loop_generates_through_generate_single_turn():
    assert "self._tool_call_loop(" in trl_source("_generate")
    loop = trl_source("_tool_call_loop")
    assert "self._generate_single_turn(" in loop  # each round's regeneration, on vLLM where the trainer uses it
    assert "tool_mask" in loop  # tool results marked 0, kept out of the loss


def test_unsloth_rewrites_generate_single_turn_for_its_vllm_engine_and_leaves_the_tool_loop_as_trl_wrote_it():
    edited = unsloth_grpo_edits()
    assert "_generate_single_turn" in edited
    assert "_tool_call_loop" not in edited
    # Unsloth copies every method that it edits into its trainer from TRL's source: the loop it does not edit is
    # inherited unchanged, and calls the edited _generate_single_turn through self
    patching = source("unsloth.models.rl", "patch_functions")
    assert "functions = dir(RLTrainer)" in patching and "edit_function(function, source)" in patching


def test_unsloths_loss_applies_the_tool_mask():
    assert "tool_mask" in parameters("unsloth_zoo.rl_replacements", "grpo_accumulated_loss")
    assert parameters("unsloth_zoo.rl_replacements", "align_completion_tool_mask")[:2] == [
        "tool_mask",
        "completion_mask",
    ]
    compute_loss = source_file("unsloth.models.rl_replacements").read_text()
    assert 'tool_mask = inputs.get("tool_mask", None)' in compute_loss
    assert '_grpo_accumulated_loss_kwargs["tool_mask"] = tool_mask' in compute_loss
    loss = source("unsloth_zoo.rl_replacements", "grpo_accumulated_loss")
    assert "align_completion_tool_mask(" in loss or "tool_mask" in loss


def test_unsloth_matches_its_fixed_templates_to_trls_and_grpo_reads_that_matching_before_loading():
    from grpo_cli import tools

    assert parameters("unsloth.models._trl_tool_templates", "with_trl_known_chat_template") == ["processing_class"]
    assert tools.UNSLOTH_TEMPLATES == "models/_trl_tool_templates.py"
    assert source_file("unsloth.models._trl_tool_templates").is_file()
    wrapped = source("unsloth.models._trl_tool_templates", "patch_trl_tool_chat_templates")
    assert "add_response_schema" in wrapped  # after import, carry_tools' add_response_schema is Unsloth's wrapper

    # a template TRL already knows goes through unchanged; the loader really runs Unsloth's function
    from transformers import AutoTokenizer

    from grpo_cli.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    tokenizer.chat_template = tools._trl_template("qwen2_5.jinja")
    assert tools._as_unsloth_matches(tokenizer) is tokenizer


def test_grpos_loop_fails_a_call_as_trls_loop_does():
    """run_tool_calls and converse mirror _tool_call_loop: the error text, the message shape, no call on the last
    round, and the rollback of a round whose results pass the completion budget."""
    loop = trl_source("_tool_call_loop")
    assert 'raise ValueError(f"Tool {name} not found.")' in loop
    assert 'result = {"error": str(e)}' in loop
    assert '{"error": f"Unsupported tool call type: {tool_call[\'type\']}"}' in loop
    assert "content = result if isinstance(result, list) else str(result)" in loop
    assert 'tool_message = {"role": "tool", "name": name, "content": content}' in loop
    assert "iteration_num < self.max_tool_calling_iterations" in loop
    assert (
        "> self.max_completion_length" in loop
        and "del completions[idx_with_tool][completions_len_before[idx] :]" in loop
    )
    assert "parse_response(" in trl_source("_generate")


def test_trl_names_the_tool_metrics_the_step_line_reads():
    text = trl_source("_generate")
    assert 'self._metrics[mode]["tools/call_frequency"]' in text
    assert 'self._metrics[mode]["tools/failure_frequency"]' in text


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_train_with_a_tool_logs_calls_and_evaluates_with_it(tmp_path):
    """Two steps with the calculator on the GPU path (Unsloth + vLLM), then eval and infer with the same tool."""
    from tests.test_gpu_path import gpu_model
    from tests.test_integration import grpo

    out = tmp_path / "out"
    stdout = grpo(
        "train", "--model", gpu_model(), "--config", "recipes/smollm2-135m-tools-cpu.yaml", "--max-steps", "2",
        "--num-generations", "4", "--batch-size", "4", "--limit", "8", "--eval-limit", "8", "--report-to", "none",
        "--output-dir", str(out),
    ).stdout  # fmt: skip
    assert "Plan: Unsloth on GPU" in stdout and "Tools: chat template" in stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("tools/call_frequency" in row for row in rows if "loss" in row)
    manifest = json.loads((out / "grpo.json").read_text())
    assert manifest["tools"]["tools"] == ["calculator"]
    grpo("eval", "--lora", str(out / "adapter"), "--limit", "8", "--output-dir", str(tmp_path / "eval"))
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())["summary"]
    assert "tool_use_rate" in summary["adapter"]
    grpo("infer", "--lora", str(out / "adapter"), "--prompt", "Ava has 38 bags with 417 pens in each bag.")


@pytest.mark.parametrize(
    "machine, matched",
    [(gpu_machine(), True), (gpu_machine(strategy="fsdp2", processes=2), False), (Machine(), False)],
)
def test_the_template_check_applies_unsloths_matching_only_where_the_run_will_have_it(monkeypatch, machine, matched):
    """Unsloth's matching of its fixed templates comes with its GPU backend's TRL patches (PatchFastRL); plain TRL
    (FSDP, ZeRO) never imports unsloth and the CPU backend installs none: the check must see what the run sees."""
    from grpo_cli import tools
    from grpo_cli.config import Settings
    from grpo_cli.plan import resolve

    assert "patch_trl_tool_chat_templates()" in source("unsloth.models.rl", "PatchFastRL")
    seen = []
    monkeypatch.setattr(tools, "_as_unsloth_matches", lambda tokenizer: seen.append(tokenizer) or tokenizer)
    tokenizer = tools.check_template("smollm2-135m", resolve(Settings(), machine))
    assert bool(seen) == matched and tokenizer.chat_template  # the tokenizer the prompts are measured with
