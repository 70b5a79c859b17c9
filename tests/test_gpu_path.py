"""The GPU path (Unsloth 4-bit + vLLM) on CPU: the calls grpo makes, against fakes held to the real API.

Every fake of Unsloth here is checked against Unsloth's installed source (tests/real_api.py): the parameters of
what it stands in for, and on which object Unsloth attaches each attribute. The vLLM fakes are checked against the
real vLLM in tests/test_vllm.py (`make test-vllm`). The end-to-end GPU tests at the bottom run on a CUDA machine.
"""

import builtins
import importlib.metadata
import inspect
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from grpo_cli import models
from grpo_cli.config import ModelSettings, Settings
from grpo_cli.generate import Pair, Sampling
from grpo_cli.plan import Machine, resolve
from tests.fakes import (
    ENGINE_NAMES,
    FakeVllmBase,
    Llama3Tokenizer,
    adapter_dir,
    fake_load_lora,
    gpu_machine,
    llama_cpp,
    unsloth_gguf_export,
)
from tests.real_api import attributes_set, parameters, source, source_file

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
VLLM = importlib.util.find_spec("vllm") is not None


# Fakes of Unsloth and vLLM, each checked below against the real one


# The fakes against Unsloth's source


def test_fakes_attach_what_unsloth_attaches_and_where():
    on_base = attributes_set("unsloth.models.llama", "FastLlamaModel.from_pretrained")
    on_peft = attributes_set("unsloth.models._utils", "patch_peft_fast_inference")
    assert "model.vllm_engine.generate" in on_base["fast_generate"]  # fast_generate is vLLM's LLM.generate
    assert {name for name in ENGINE_NAMES if hasattr(FakeVllmBase(), name)} == ENGINE_NAMES & on_base.keys()
    assert "load_lora" not in on_base and "load_lora" in on_peft  # a base model has no load_lora: PEFT models do


def test_fake_load_lora_is_unsloth_zoos():
    assert list(inspect.signature(fake_load_lora).parameters) == parameters("unsloth_zoo.vllm_utils", "load_lora")
    assert "LoRARequest(str(lora_request_id), lora_request_id, save_directory)" in source(
        "unsloth_zoo.vllm_utils", "_build_lora_request"
    )  # a directory becomes a plain vLLM LoRA request for that path


# 1. infer / eval --lora on the vLLM path; 6. one BOS


def test_vllm_pair_sends_the_adapter_as_a_lora_request(fake_unsloth, fake_vllm, on_gpu, tmp_path):
    seen, _, _ = fake_unsloth
    lora = adapter_dir(tmp_path / "run" / "adapter")
    pair = Pair(None, lora)
    assert seen["fast_inference"] is True and seen["max_lora_rank"] == 8
    texts = pair.texts(["2+2?"], "Be brief.")
    sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=64, seed=7)
    assert pair.base(texts, sampling) == ["base"] and pair.tuned(texts, sampling) == ["tuned"]
    base, tuned = pair.engine.model.vllm_engine.calls
    assert base["lora_request"] is None and tuned["lora_request"] == ("lora-request", str(lora))
    assert tuned["params"] == [{"temperature": 0.8, "top_p": 0.95, "max_tokens": 64, "seed": 7}]


def test_vllm_gives_each_request_its_own_seed(fake_unsloth, fake_vllm, on_gpu, tmp_path):
    """vLLM draws a seeded request from a generator of its own: one seed for a prompt repeated G times (the dry
    run's groups) would give G identical completions."""
    pair = Pair(None, adapter_dir(tmp_path / "run" / "adapter"))
    pair.base(pair.texts(["q"] * 4, ""), Sampling(seed=7, max_tokens=8))
    assert [p["seed"] for p in pair.engine.model.vllm_engine.calls[0]["params"]] == [7, 8, 9, 10]


def test_vllm_prompts_are_token_ids_with_the_templates_one_bos(fake_unsloth, fake_vllm, on_gpu, tmp_path):
    base_model = adapter_dir(tmp_path / "run" / "adapter").parent / "base"
    pair = Pair(str(base_model), None)
    texts = pair.texts(["2+2?"], "Be brief.")
    pair.base(texts, Sampling(max_tokens=8))
    # text would be tokenized again with special tokens, which puts a second BOS before the template's own
    (prompt,) = pair.engine.model.vllm_engine.calls[0]["prompts"]
    assert set(prompt) == {"prompt_token_ids"}
    assert prompt["prompt_token_ids"] == Llama3Tokenizer()(texts, add_special_tokens=False)["input_ids"][0]
    assert prompt["prompt_token_ids"][:2].count(Llama3Tokenizer.bos) == 1


def test_vllm_greedy_is_temperature_zero(fake_unsloth, fake_vllm, on_gpu, tmp_path):
    pair = Pair(None, adapter_dir(tmp_path / "run" / "adapter"))
    pair.base(pair.texts(["q"], ""), Sampling(greedy=True, max_tokens=16))
    assert pair.engine.model.vllm_engine.calls[0]["params"][0]["temperature"] == 0.0


# Loading: what Unsloth is asked for on GPU and on CPU


@pytest.mark.parametrize("has_vllm, expected", [(True, True), (False, False)])
def test_cuda_load_asks_unsloth_for_vllm(fake_unsloth, has_vllm, expected):
    seen, path, _ = fake_unsloth
    settings = ModelSettings(model=path, lora_rank=32, gpu_memory_utilization=0.5)  # 4-bit: auto
    plan = resolve(Settings(model=settings), gpu_machine(vllm=has_vllm))
    model, _ = models.load_model(settings, plan)
    models.add_lora(model, settings, plan)
    assert seen["fast_inference"] is expected and seen["gpu_memory_utilization"] == 0.5
    assert seen["load_in_4bit"] is True and seen["max_lora_rank"] == 32
    assert seen["peft"]["use_gradient_checkpointing"] == "unsloth" and seen["peft"]["r"] == 32
    assert plan.generator == ("vllm" if expected else "transformers")


def test_cuda_load_for_a_vllm_server_is_16_bit_without_unsloths_engine(fake_unsloth, on_gpu, capsys):
    """Unsloth's trainer keeps TRL's server mode only for a model without its own engine (vllm_engine), and TRL
    sends the server merged weights, which a 4-bit base cannot give."""
    seen, path, _ = fake_unsloth
    settings = ModelSettings(model=path, vllm_server="http://gen:8000")
    plan = resolve(Settings(model=settings), gpu_machine())
    models.load_model(settings, plan)
    assert seen["fast_inference"] is False and seen["load_in_4bit"] is False
    assert plan.line() == (
        "Plan: Unsloth on GPU | generation: a vLLM server (TRL's server mode) | bf16 weights "
        "(16-bit base: TRL sends the server merged weights)"
    )
    rl = source_file("unsloth.models.rl").read_text()
    assert "if hasattr(model, 'vllm_engine') and hasattr(args, 'use_vllm')" in rl  # only then colocate is forced


def test_cpu_load_does_not_ask_for_vllm(fake_unsloth):
    seen, path, _ = fake_unsloth
    settings = ModelSettings(model=path)
    _, tokenizer = models.load_model(settings, resolve(Settings(model=settings), Machine(vllm=True)))
    assert "fast_inference" not in seen and tokenizer.pad_token == "</s>"
    assert seen["attention"] == "sdpa_cpu"
    assert seen["load_in_4bit"] is False  # 16-bit is faster on CPU; a recipe can force 4-bit
    settings = ModelSettings(model=path, load_in_4bit=True)
    models.load_model(settings, resolve(Settings(model=settings), Machine()))
    assert seen["load_in_4bit"] is True


# 2. --standby reaches unsloth before its first import, through `grpo train`


def test_standby_is_read_by_unsloth_at_import():
    # unsloth_zoo decides the allocator (expandable segments unless standby) when it is imported
    assert re.search(r"os\.environ\.get\(['\"]UNSLOTH_VLLM_STANDBY['\"]", (Path(
        importlib.util.find_spec("unsloth_zoo").origin).read_text()))  # fmt: skip


@pytest.mark.parametrize("recipe", ["top_p: 1.0\n", None])  # a GRPOConfig field in a recipe is checked by importing
def test_standby_is_set_before_grpo_train_first_imports_unsloth(monkeypatch, tmp_path, recipe, on_gpu):
    from grpo_cli.cli import app

    monkeypatch.delenv("UNSLOTH_VLLM_STANDBY", raising=False)
    seen = []
    real_import = builtins.__import__

    class FirstImport(Exception):
        pass

    def spy(name, *args, **kwargs):
        if name == "unsloth" or name.startswith("unsloth."):
            seen.append(os.environ.get("UNSLOTH_VLLM_STANDBY"))
            raise FirstImport
        return real_import(name, *args, **kwargs)

    args = ["train", "--standby", "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]
    if recipe:
        (tmp_path / "r.yaml").write_text(recipe)
        args += ["--config", str(tmp_path / "r.yaml")]
    monkeypatch.setattr(builtins, "__import__", spy)
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, FirstImport) and seen == ["1"]


# 3. save-lora --gguf: the adapter merged in, the file inside OUT_DIR; 4. no vLLM engine for merging


def test_gguf_export_fake_is_unsloths():
    real = parameters("unsloth.save", "unsloth_save_pretrained_gguf")
    assert real[0] == "self" and real[1:4] == list(inspect.signature(unsloth_gguf_export).parameters)


def test_save_lora_gguf_loads_the_adapter_as_unsloth_does_and_writes_inside_out_dir(
    monkeypatch, fake_unsloth, tmp_path
):
    from grpo_cli.adapter import save_lora

    seen, _, module = fake_unsloth
    monkeypatch.setattr(Machine, "here", classmethod(lambda cls: gpu_machine()))
    monkeypatch.setenv("UNSLOTH_LLAMA_CPP_PATH", str(llama_cpp(tmp_path / "llama.cpp")))
    exported = []

    def from_adapter(**kwargs):
        seen["loads"].append(kwargs)
        peft_model = types.SimpleNamespace(
            save_pretrained_gguf=lambda *a, **kw: (exported.append((a, kw)), unsloth_gguf_export(*a, **kw))
        )
        return peft_model, object()

    monkeypatch.setattr(module.FastLanguageModel, "from_pretrained", from_adapter)
    lora = adapter_dir(tmp_path / "run" / "adapter")
    out = tmp_path / "exports" / "gguf"
    save_lora(lora.parent, out, gguf="q5_k_m")
    (load,) = seen["loads"]
    assert load["model_name"] == str(lora) and load["fast_inference"] is False and load["load_in_4bit"] is False
    assert set(load) <= set(parameters("unsloth.models.loader", "FastLanguageModel.from_pretrained"))
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "grpo.json", "model.Q5_K_M.gguf"]
    assert (out / "Modelfile").read_text().startswith("FROM ./model.Q5_K_M.gguf\n")
    assert [p.name for p in out.parent.iterdir()] == ["gguf"]  # nothing left beside OUT_DIR
    assert json.loads((out / "grpo.json").read_text())["format"] == "gguf q5_k_m"


def test_save_lora_merged_starts_no_vllm_engine(monkeypatch, tmp_path):
    from grpo_cli.adapter import save_lora

    asked = []

    class Loaded(Exception):
        pass

    def load_model(settings, plan):
        asked.append(plan)
        raise Loaded

    monkeypatch.setattr(Machine, "here", classmethod(lambda cls: gpu_machine()))
    monkeypatch.setattr(models, "load_model", load_model)
    with pytest.raises(Loaded):
        save_lora(adapter_dir(tmp_path / "run" / "adapter").parent, tmp_path / "merged", merged=True)
    (plan,) = asked
    assert plan.generator == "transformers" and plan.weights == "bf16"


# 5. On a GPU, Unsloth's trainer is used as it is (its loss only checked to be finite)


def test_gpu_trainer_is_unsloths_untouched_and_cpu_override_matches_trl():
    import trl

    from grpo_cli.trainer import trainer_class

    gpu = trainer_class(resolve(Settings(), gpu_machine()))  # Unsloth's, with only a finite-loss check
    from grpo_cli.batch import BatchBuilder

    assert gpu.__bases__ == (BatchBuilder, trl.GRPOTrainer)  # the batch (curriculum, dynamic sampling) where asked
    # the finite-loss check, and __init__ only to give server mode its out-of-place weight sync
    assert {name for name, value in vars(gpu).items() if callable(value)} == {"compute_loss", "__init__"}
    cpu = trainer_class(resolve(Settings(), Machine()))
    assert inspect.signature(cpu._get_per_token_logps_and_entropies).parameters.keys() <= set(
        inspect.signature(trl.GRPOTrainer._get_per_token_logps_and_entropies).parameters
    ) | {"multimodal"}
    assert (
        list(inspect.signature(cpu._get_per_token_logps_and_entropies).parameters)[:8]
        == list(inspect.signature(trl.GRPOTrainer._get_per_token_logps_and_entropies).parameters)[:8]
    )


# 8. PatchFastRL only where importing unsloth has not patched TRL already


def test_patch_fast_rl_is_unsloths_and_knows_when_trl_is_patched():
    assert parameters("unsloth.models.rl", "PatchFastRL") == ["algorithm", "FastLanguageModel"]
    patching = source("unsloth.models.rl", "_patch_trl_rl_trainers_impl")
    assert "RLTrainer.__name__.startswith('Unsloth')" in patching  # Unsloth's own "already patched" test
    assert re.search(r"trl\.\{RLTrainer_name\} = created_module\.Unsloth\{RLTrainer_name\}", patching)


@pytest.mark.parametrize("trainer_name, called", [("UnslothGRPOTrainer", False), ("GRPOTrainer", True)])
def test_patch_fast_rl_is_called_only_where_it_does_something(monkeypatch, fake_unsloth, trainer_name, called):
    import trl

    _, _, module = fake_unsloth
    calls = []
    module.PatchFastRL = lambda algorithm=None, FastLanguageModel=None: calls.append(algorithm)  # noqa: N803
    monkeypatch.setattr(trl, "GRPOTrainer", type(trainer_name, (), {}))
    models.patch_fast_rl(resolve(Settings(), gpu_machine()))
    assert calls == (["GRPO"] if called else [])
    models.patch_fast_rl(resolve(Settings(), gpu_machine(strategy="zero3", processes=2)))
    assert calls == (["GRPO"] if called else [])  # plain TRL: unsloth is not even imported


# 7. The GPU install: pinned, inside TRL's vLLM window


def gpu_pins() -> dict[str, str]:
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", spec).groups() for spec in extra)


def test_gpu_extra_is_pinned_inside_trls_vllm_window():
    from packaging.requirements import Requirement

    pins = gpu_pins()  # every requirement is ==: a registry's newest release never sneaks in
    window = next(
        Requirement(r.split(";")[0]).specifier
        for r in importlib.metadata.requires("trl")
        if r.startswith("vllm") and 'extra == "vllm"' in r
    )
    assert pins["vllm"] in window, f"vllm {pins['vllm']} is outside TRL's supported {window}"
    assert pins["trl"] == importlib.metadata.version("trl") and pins["torch"] == "2.13.0"


def test_makefile_installs_the_pinned_unsloth_on_both_paths():
    makefile = (ROOT / "Makefile").read_text()
    lines = makefile.splitlines()
    (at,) = [i for i, line in enumerate(lines) if "--no-deps unsloth==" in line]
    assert "unsloth==2026.10.9" in lines[at] and "unsloth_zoo==2026.10.9" in lines[at]
    assert lines.index("endif") < at  # after the GPU/CPU branches: both take it


# On a real GPU (skipped elsewhere): the whole path on the real stack


def grpo(*args, env=None):
    result = subprocess.run([sys.executable, "-m", "grpo_cli", *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, (
        f"grpo {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def gpu_model() -> str:
    """GRPO_GPU_MODEL (a model directory or .gguf, for machines without the embedded package), else the embedded."""
    return os.environ.get("GRPO_GPU_MODEL", "smollm2-135m")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    (root / "recipe.yaml").write_text("warmup_ratio: 0.0\nmax_grad_norm: 1.0\n")
    out = root / "out"
    result = grpo(
        "train", "--model", gpu_model(), "--config", str(root / "recipe.yaml"), "--max-steps", "2",
        "--num-generations", "4", "--batch-size", "4", "--max-completion-length", "32", "--lora-rank", "8",
        "--learning-rate", "2e-2", "--save-steps", "2", "--limit", "8", "--reward", "answer_tag",
        "--reward", "tests/length_reward.py:longer:0.5", "--output-dir", str(out),
    )  # fmt: skip
    return out, result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_train_4bit_lora_two_steps_checkpoint_save_infer_eval_merge(gpu_run, tmp_path):
    out, stdout = gpu_run
    assert "Plan: Unsloth on GPU" in stdout and "step 2/2 | reward" in stdout
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (out / "checkpoint-2" / "optimizer.pt").is_file()
    assert "optimizer paged_adamw_8bit needs CUDA" not in stdout  # kept on a GPU, as the reference
    manifest = json.loads((out / "grpo.json").read_text())
    assert manifest["settings"]["train"]["optim"] == "paged_adamw_8bit"
    grpo("save-lora", str(out), str(tmp_path / "lora"))
    rows = json.loads(grpo("infer", "--lora", str(tmp_path / "lora"), "--prompt", "What is 7 + 5?", "--max-tokens",
                           "32", "--seed", "1", "--json").stdout)  # fmt: skip
    assert rows[0]["base"] != rows[0]["adapter"]
    grpo("eval", "--lora", str(tmp_path / "lora"), "--limit", "8", "--output-dir", str(tmp_path / "eval"))
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())["summary"]
    assert set(summary) == {"base", "adapter"}
    grpo("save-lora", str(out), str(tmp_path / "merged"), "--merged")
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_model_loads_4bit_with_lora():
    settings = ModelSettings(model=gpu_model(), lora_rank=8, fast_inference=False)
    plan = resolve(Settings(model=settings))
    model, _ = models.load_model(settings, plan)
    assert getattr(model, "is_loaded_in_4bit", False) and plan.weights == "4bit"
    model = models.add_lora(model, settings, plan)
    assert any("lora_A" in name for name, _ in model.named_parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_standby_turns_expandable_segments_off():
    code = (
        "import os, sys; from grpo_cli.config import load_settings; "
        "load_settings(None, {'vllm_standby': True}); import unsloth; "
        "print('ALLOC', os.environ.get('PYTORCH_ALLOC_CONF', ''))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "UNSLOTH_VLLM_STANDBY")}
    with_standby = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    without = subprocess.run(
        [sys.executable, "-c", code.replace("True", "False")], capture_output=True, text=True, env=env, check=True
    )
    assert "expandable_segments:True" not in with_standby.stdout.split("ALLOC", 1)[1]
    assert "expandable_segments:True" in without.stdout.split("ALLOC", 1)[1]


@pytest.mark.vllm
@pytest.mark.skipif(not (CUDA and VLLM), reason="needs CUDA and vLLM")
def test_vllm_fast_generate_with_and_without_the_adapter_one_bos(gpu_run, tmp_path):
    out, stdout = gpu_run
    assert "Plan: Unsloth on GPU | generation: Unsloth's vLLM" in stdout
    pair = Pair(None, out / "adapter")
    assert pair.engine.__class__.__name__ == "VLLMEngine"
    texts = pair.texts(["What is 7 + 5?"], None)
    greedy = Sampling(greedy=True, max_tokens=32)
    base, tuned = pair.base(texts, greedy), pair.tuned(texts, greedy)
    assert base != tuned
    ids = pair.tokenizer(texts, add_special_tokens=False)["input_ids"][0]
    outputs = pair.engine.model.fast_generate([{"prompt_token_ids": ids}], use_tqdm=False)
    bos = pair.tokenizer.bos_token_id
    assert outputs[0].prompt_token_ids == ids and (bos is None or outputs[0].prompt_token_ids[:2].count(bos) <= 1)
