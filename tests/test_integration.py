"""The real commands on the embedded SmolLM2-135M, on CPU, with tiny settings."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def grpo(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "grpo_cli", *args], capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"grpo {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two GRPO steps; a length reward guarantees spread within each group, so the LoRA must move."""
    root = tmp_path_factory.mktemp("run")
    out = root / "out"
    # no warm-up and a loose clip, so both steps move the adapter enough to change what it says
    (root / "recipe.yaml").write_text("warmup_ratio: 0.0\nmax_grad_norm: 1.0\n")
    result = grpo(
        "train", "--config", str(root / "recipe.yaml"), "--max-steps", "2", "--num-generations", "4", "--batch-size", "4",
        "--max-completion-length", "16", "--lora-rank", "8", "--learning-rate", "2e-2", "--save-steps", "1", "--beta", "0.04",
        "--system-prompt", "Answer in one short sentence.", "--limit", "8",
        "--reward", "answer_tag", "--reward", "tests/length_reward.py:longer:0.5", "--output-dir", str(out),
        "--report-to", "tensorboard", "--eval-steps", "2", "--eval-limit", "4",
    )  # fmt: skip
    return out, result.stdout


def test_train_prints_steps_and_writes_adapter_and_metrics(run):
    out, stdout = run
    assert "step 1/2 | reward" in stdout and "step 2/2 | reward" in stdout and "longer" in stdout
    assert {"adapter_config.json", "adapter_model.safetensors", "grpo.json"} <= {
        p.name for p in (out / "adapter").iterdir()
    }
    assert not (out / "adapter" / "ref").exists()  # TRL's frozen reference copy stays out of the adapter
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "adapter" / "README.md")  # the adapter documents itself
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "for 2 steps" in card.text
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "reward" in m] == [1, 2] and "rewards/longer/mean" in metrics[-1]


def test_tensorboard_holds_reward_per_reward_means_and_kl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run[0].rglob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/reward", "train/rewards/answer_tag_reward/mean", "train/rewards/longer/mean", "train/kl"} <= set(
        scalars
    )
    assert {"eval/accuracy", "eval/format_rate", "eval/mean_length"} <= set(scalars)


def test_held_out_evaluation_before_and_during_training(run):
    out, stdout = run
    assert "Evaluating before step 1 and every 2 steps on arithmetic (test)" in stdout
    assert "step 0/2 | eval accuracy" in stdout and re.search(r"step 2/2 \| reward .* \| eval accuracy", stdout)
    evals = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_accuracy" in m]
    assert [m["step"] for m in evals] == [0, 2] and all(0 <= m["eval_format_rate"] <= 1 for m in evals)
    card = (out / "adapter" / "README.md").read_text()
    assert "## Held-out evaluation" in card and "| accuracy |" in card


def test_lora_weights_moved(run):
    from safetensors.torch import load_file

    weights = load_file(run[0] / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b)  # lora_B starts at zero


def test_manifest(run):
    manifest = json.loads((run[0] / "adapter" / "grpo.json").read_text())
    assert manifest["base_model"] == "smollm2-135m" and manifest["step"] == 2
    assert manifest["system_prompt"] == "Answer in one short sentence."
    assert manifest["rewards"][0] == "answer_tag" and manifest["last_reward"] is not None


def test_save_lora_from_a_checkpoint_and_refuse_overwrite(run, tmp_path):
    out = tmp_path / "lora"
    grpo("save-lora", str(run[0] / "checkpoint-1"), str(out))
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "grpo.json"
    ]  # fmt: skip
    assert json.loads((out / "grpo.json").read_text())["step"] == 1
    before = (out / "adapter_model.safetensors").read_bytes()
    refused = grpo("save-lora", str(run[0]), str(out), check=False)
    assert refused.returncode == 2 and "is not empty: choose another directory or pass --force" in refused.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == before
    grpo("save-lora", str(run[0]), str(out), "--force")
    assert json.loads((out / "grpo.json").read_text())["step"] == 2


def test_infer_round_trip_adapter_differs_from_base(run):
    args = ["infer", "--lora", str(run[0] / "adapter"), "--prompt", "What is 7 + 5?", "--max-tokens", "24", "--json"]
    first = json.loads(grpo(*args, "--seed", "1").stdout)
    again = json.loads(grpo(*args, "--seed", "1").stdout)
    assert first == again  # a fixed seed repeats
    assert first[0]["base"] != first[0]["adapter"]


def test_infer_without_an_adapter_answers_with_the_base_and_its_plan():
    result = grpo("infer", "--prompt", "What is 2+3?", "--max-tokens", "8", "--json")
    (row,) = json.loads(result.stdout)
    assert row["prompt"] == "What is 2+3?" and isinstance(row["base"], str) and "adapter" not in row
    assert "Plan: Unsloth on CPU" in result.stderr


def test_the_run_keeps_its_plan_and_infer_reloads_that_base(run):
    manifest = json.loads((run[0] / "adapter" / "grpo.json").read_text())
    plan = manifest["plan"]
    assert plan["trainer"] == "unsloth" and plan["generator"] == "transformers" and plan["device"] == "cpu"
    from grpo_cli.generate import Pair

    assert Pair(None, run[0] / "adapter").plan.weights == plan["weights"]


def test_infer_applies_the_manifest_prompt_and_refuses_another_base(run, tmp_path):
    from grpo_cli.generate import Pair

    pair = Pair(None, run[0] / "adapter")
    assert "Answer in one short sentence." in pair.texts(["q"], None)[0]
    assert "Other prompt" in pair.texts(["q"], "Other prompt")[0]
    assert pair.manifest["step"] == 2
    # a checkpoint has no manifest of its own: the run's applies, with the checkpoint's step
    from grpo_cli.adapter import find_adapter

    adapter, manifest = find_adapter(run[0] / "checkpoint-1")
    assert manifest["system_prompt"] == "Answer in one short sentence." and manifest["step"] == 1

    other = tmp_path / "other"
    shutil.copytree(run[0] / "adapter", other)
    manifest = json.loads((other / "grpo.json").read_text())
    (other / "grpo.json").write_text(json.dumps(manifest | {"base_fingerprint": "0123456789abcdef"}))
    refused = grpo("infer", "--lora", str(other), "--prompt", "hi", check=False)
    assert refused.returncode == 2
    assert "was trained on smollm2-135m (config 0123456789abcdef), not on smollm2-135m (config" in refused.stderr


def test_embedded_tokenizer_ends_at_im_end_and_generation_stops_there():
    from grpo_cli.config import ModelSettings
    from grpo_cli.generate import Sampling, chat_texts, generate_hf
    from grpo_cli.models import load_model
    from grpo_cli.plan import for_inference

    settings = ModelSettings(lora_rank=8)
    model, tokenizer = load_model(settings, for_inference(settings))
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    texts = chat_texts(tokenizer, ["What is the capital of France? Answer in one word."], "")
    batch = tokenizer(texts, return_tensors="pt", add_special_tokens=False)
    ids = model.generate(**batch, max_new_tokens=64, do_sample=False)[0, batch["input_ids"].shape[1] :]
    assert ids[-1].item() == 2 and len(ids) < 64  # stopped on <|im_end|>, well before the limit
    assert generate_hf(model, tokenizer, texts, Sampling(max_tokens=64, greedy=True))[0].strip()


@pytest.mark.skipif(not __import__("tests.conftest").conftest.SHARED_GSM8K.is_dir(), reason="no ../shared GSM8K")
def test_train_on_the_real_gsm8k_file(tmp_path):
    from tests.conftest import SHARED_GSM8K

    result = grpo(
        "train", "--dataset", str(SHARED_GSM8K / "train.jsonl"), "--max-steps", "1", "--num-generations", "2",
        "--batch-size", "2", "--max-completion-length", "8", "--lora-rank", "4", "--limit", "4",
        "--output-dir", str(tmp_path / "gsm8k"),
    )  # fmt: skip
    assert "Training on 4 prompts" in result.stdout and "step 1/1 | reward" in result.stdout


def test_ctrl_c_saves_a_loadable_adapter_and_resume_continues(tmp_path):
    import signal

    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "grpo_cli", "train", "--max-steps", "50", "--num-generations", "2", "--batch-size", "2",
        "--max-completion-length", "8", "--lora-rank", "4", "--save-steps", "100", "--learning-rate", "1e-3",
        "--reward", "answer_tag", "--reward", "tests/length_reward.py:longer", "--output-dir", str(out),
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 2/50"):
            process.send_signal(signal.SIGINT)
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=300) == 130, "".join(lines)
    stopped = json.loads((out / "adapter" / "grpo.json").read_text())["step"]
    assert 2 <= stopped < 50 and (out / f"checkpoint-{stopped}").is_dir() and (out / "rewards.png").is_file()

    from peft import PeftConfig
    from safetensors.torch import load_file

    assert PeftConfig.from_pretrained(str(out / "adapter")).r == 4
    assert load_file(out / "adapter" / "adapter_model.safetensors")

    grpo("train", "--resume", "latest", "--output-dir", str(out), "--max-steps", str(stopped + 1))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stopped + 2))  # one continuous file, no step twice
    assert json.loads((out / "adapter" / "grpo.json").read_text())["step"] == stopped + 1


def test_dry_run_reports_each_reward_and_writes_nothing(tmp_path):
    result = grpo(
        "train", "--dry-run", "--num-generations", "2", "--batch-size", "2", "--max-completion-length", "8",
        "--reward", "answer_tag", "--reward", "correctness", "--output-dir", str(tmp_path / "never"),
    )  # fmt: skip
    assert "Rewards on 8 prompts x 2 base-model completions" in result.stdout
    assert "answer_tag" in result.stdout and "groups with no spread" in result.stdout
    assert "parse failures" in result.stdout and not (tmp_path / "never").exists()


def test_hub_id_without_network_says_what_to_do(tmp_path):
    import os

    result = subprocess.run(
        [sys.executable, "-m", "grpo_cli", "train", "--model", "someorg/no-such-model", "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "could not load someorg/no-such-model from the hub" in result.stderr
    assert "pass a local path, or use the embedded smollm2-135m" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_save_lora_merged_and_gguf_on_cpu(run, tmp_path):
    from safetensors.torch import load_file

    from grpo_cli.models import resolve_model

    # unsloth patches PEFT and transformers when imported: it must come first (the spy prints the import order)
    spy = (
        "import sys\n"
        "class Spy:\n"
        "    seen = []\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('unsloth', 'peft') and name not in self.seen:\n"
        "            self.seen.append(name); print('IMPORTED', name, file=sys.stderr)\n"
        "sys.meta_path.insert(0, Spy())\n"
        "from grpo_cli.cli import main\n"
        "sys.argv = ['grpo'] + sys.argv[1:]\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", spy, "save-lora", str(run[0]), str(tmp_path / "merged"), "--merged"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stderr.splitlines() if line.startswith("IMPORTED")] == [
        "unsloth",
        "peft",
    ]
    saved = json.loads((tmp_path / "merged" / "grpo.json").read_text())
    assert saved["format"] == "merged 16-bit" and saved["dtype"] == "bfloat16"  # the run computed in fp32 on CPU
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(Path(resolve_model("smollm2-135m")) / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    weights = sum(t.numel() for t in merged.values())
    assert (tmp_path / "merged" / "model.safetensors").stat().st_size < 2 * weights + 1e6  # 16-bit, not fp32
    name = "model.layers.0.self_attn.q_proj.weight"
    # without the merge these would be equal: the base is saved in the merged model's dtype
    assert merged[name].shape == base[name].shape and not torch.equal(merged[name], base[name].to(merged[name].dtype))

    refused = grpo("save-lora", str(run[0]), str(tmp_path / "gguf"), "--gguf", "q5_k_m", check=False)
    assert refused.returncode == 2 and "here, use --gguf f16, bf16, q8_0" in refused.stderr
    assert not (tmp_path / "gguf").exists()


def test_a_reward_that_raises_at_step_3_keeps_step_2_and_resume_continues(tmp_path):
    out = tmp_path / "out"
    args = ["train", "--max-steps", "4", "--num-generations", "4", "--batch-size", "4", "--max-completion-length", "8",
            "--lora-rank", "4", "--limit", "8", "--save-steps", "10", "--reward", "tests/failing_reward.py:fails_on_third_call",
            "--output-dir", str(out)]  # fmt: skip
    failed = grpo(*args, check=False)
    assert failed.returncode == 3, failed.stderr
    (last,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert "a reward failed at step 3: reward fails_on_third_call raised ValueError: the third call fails" in last
    assert f"fix the cause, then: grpo train --resume latest --output-dir {out}" in last
    assert "Traceback" not in failed.stderr and "ValueError" in (out / "error.log").read_text()
    from grpo_cli.runs import broken

    assert broken(out / "checkpoint-2") is None and not (out / ".grpo.lock").exists()
    assert json.loads((out / "adapter" / "grpo.json").read_text())["step"] == 2
    from safetensors.torch import load_file

    assert load_file(out / "adapter" / "adapter_model.safetensors")  # the step-2 adapter loads
    resumed = grpo("train", "--resume", "latest", "--output-dir", str(out))
    assert "step 3/4" in resumed.stdout and "step 1/4" not in resumed.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


def test_no_signal_warns_and_can_stop_with_a_checkpoint(tmp_path):
    (tmp_path / "recipe.yaml").write_text("no_signal_steps: 2\n")
    out = tmp_path / "out"
    result = grpo(
        "train", "--config", str(tmp_path / "recipe.yaml"), "--max-steps", "4", "--num-generations", "2",
        "--batch-size", "2", "--max-completion-length", "8", "--lora-rank", "4", "--limit", "4",
        "--reward", "xmlcount", "--reward", "soft_format", "--reward", "strict_format", "--reward", "integer",
        "--reward", "correctness", "--stop-on-no-signal", "--output-dir", str(out),
    )  # fmt: skip
    assert "warning: no learning signal for 2 steps" in result.stdout and "have no <answer> tag" in result.stdout
    assert "Stopping with a checkpoint (--stop-on-no-signal)" in result.stdout
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-3").exists()
    assert json.loads((out / "adapter" / "grpo.json").read_text())["step"] == 2
