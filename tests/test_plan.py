"""The run plan: every plan a user can reach, and the defects that came from deciding in many places. Each test
that stands for a library's behaviour is held to that library's installed source (tests/real_api.py)."""

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from grpo_cli.config import DataSettings, ModelSettings, Settings, TrainSettings
from grpo_cli.plan import Machine, for_inference, resolve
from tests.fakes import gpu_machine
from tests.real_api import parameters, source, source_file

ROOT = Path(__file__).resolve().parents[1]
CPU_AVX2 = Machine(cpu_kind="avx2")
CPU_BF16 = Machine(cpu_kind="avx512_bf16", cpu_bf16=True)
SERVER = "http://gen:8000"


def settings(train: dict | None = None, **model) -> Settings:
    return Settings(model=ModelSettings(**model), data=DataSettings(rewards=["answer_tag"]),
                    train=TrainSettings(**(train or {})))  # fmt: skip


# Every plan a user can reach: (settings, machine) -> trainer, generator, weights, CPU paths
PLANS = [
    ("cpu avx2", settings(), CPU_AVX2, "unsloth", "transformers", "fp32", True),
    ("cpu bf16", settings(), CPU_BF16, "unsloth", "transformers", "bf16", True),
    ("cpu 4-bit asked", settings(load_in_4bit=True), CPU_AVX2, "unsloth", "transformers", "4bit", True),
    ("cpu ddp", settings(), dataclasses.replace(CPU_AVX2, strategy="ddp", processes=2), "unsloth", "transformers",
     "fp32", True),
    ("cpu fsdp2", settings(), dataclasses.replace(CPU_AVX2, strategy="fsdp2", processes=2), "trl", "transformers",
     "fp32", False),
    ("gpu", settings(), gpu_machine(), "unsloth", "vllm", "4bit", False),
    ("gpu fp16", settings(), gpu_machine(cuda_bf16=False), "unsloth", "vllm", "4bit", False),
    ("gpu 16-bit asked", settings(load_in_4bit=False), gpu_machine(), "unsloth", "vllm", "bf16", False),
    ("gpu no vllm", settings(), gpu_machine(vllm=False), "unsloth", "transformers", "4bit", False),
    ("gpu fast_inference off", settings(fast_inference=False), gpu_machine(), "unsloth", "transformers", "4bit",
     False),
    ("gpu server", settings(vllm_server=SERVER), gpu_machine(), "unsloth", "server", "bf16", False),
    ("gpu ddp", settings(), gpu_machine(strategy="ddp", processes=2), "unsloth", "vllm", "4bit", False),
    ("gpu fsdp", settings(), gpu_machine(strategy="fsdp", processes=2), "trl", "transformers", "4bit", False),
    ("gpu fsdp2", settings(), gpu_machine(strategy="fsdp2", processes=2), "trl", "transformers", "bf16", False),
    ("gpu zero2", settings(), gpu_machine(strategy="zero2", processes=2), "trl", "transformers", "4bit", False),
    ("gpu zero3", settings(), gpu_machine(strategy="zero3", processes=2), "trl", "transformers", "4bit", False),
    ("gpu zero3 server", settings(vllm_server=SERVER), gpu_machine(strategy="zero3", processes=2), "trl", "server",
     "bf16", False),
    ("gpu standby", settings(vllm_standby=True), gpu_machine(), "unsloth", "vllm", "4bit", False),
    ("gpu fp16 16-bit", settings(load_in_4bit=False), gpu_machine(cuda_bf16=False), "unsloth", "vllm", "fp16", False),
    ("cpu bf16 forced", settings(), Machine(cpu_kind="avx2", cpu_bf16=True, cpu_bf16_forced=True), "unsloth",
     "transformers", "bf16", True),
    ("cpu fp32 forced", settings(), Machine(cpu_kind="amx", cpu_bf16=False, cpu_bf16_forced=True), "unsloth",
     "transformers", "fp32", True),
]  # fmt: skip


@pytest.mark.parametrize("name, s, machine, trainer, generator, weights, cpu_paths", PLANS, ids=[p[0] for p in PLANS])
def test_every_reachable_plan(name, s, machine, trainer, generator, weights, cpu_paths):
    plan = resolve(s, machine)
    assert (plan.trainer, plan.generator, plan.weights, plan.cpu_paths) == (trainer, generator, weights, cpu_paths)
    assert plan.problem is None
    line = plan.line()
    assert line.startswith("Plan: ") and "\n" not in line
    assert json.loads(json.dumps(plan.to_dict()))["weights"] == weights  # grpo.json keeps it


def test_no_vllm_is_named_only_where_it_was_asked_for():
    assert "vLLM is not installed" in resolve(settings(), gpu_machine(vllm=False)).line()
    assert "vLLM" not in resolve(settings(fast_inference=False), gpu_machine(vllm=False)).line()
    assert "vLLM" not in resolve(settings(), CPU_AVX2).line()


def test_plans_that_cannot_train_say_why_in_one_line():
    assert "CUDA machine with vLLM" in resolve(settings(vllm_server=SERVER), CPU_AVX2).problem
    assert "CUDA machine with vLLM" in resolve(settings(vllm_server=SERVER), gpu_machine(vllm=False)).problem
    fsdp = resolve(settings({"eval_steps": 5}), gpu_machine(strategy="fsdp2", processes=2))
    assert fsdp.problem.startswith("--eval-steps: evaluation during training runs alone or under DDP")


@pytest.mark.parametrize(
    "machine, trained, generator, weights",
    [(gpu_machine(), {"weights": "bf16"}, "vllm", "bf16"), (gpu_machine(), None, "vllm", "4bit"),
     (gpu_machine(vllm=False), {"weights": "4bit"}, "transformers", "4bit"), (CPU_BF16, {"weights": "bf16"},
     "transformers", "bf16"), (gpu_machine(strategy="fsdp2", processes=2), {"weights": "bf16"}, "vllm", "bf16")],
)  # fmt: skip
def test_every_inference_plan(monkeypatch, machine, trained, generator, weights):
    """infer and eval: one process whatever launched the run, Unsloth's vLLM where there is one, the base as the
    run loaded it."""
    monkeypatch.setattr(Machine, "here", classmethod(lambda cls: machine))
    plan = for_inference(ModelSettings(model="qwen2.5-1.5b"), trained)
    assert (plan.trainer, plan.generator, plan.weights, plan.processes) == ("unsloth", generator, weights, 1)


def test_infer_and_eval_load_the_base_as_the_run_loaded_it():
    """Defect 9: grpo.json records the weights as loaded; a 16-bit run (a vLLM server, FSDP2) is not reloaded in
    4-bit, which Unsloth would map to another repository."""
    trained = resolve(settings(vllm_server=SERVER), gpu_machine())
    assert trained.weights == "bf16"
    model = ModelSettings(model="Qwen/Qwen2.5-1.5B-Instruct")
    import grpo_cli.plan as plan_module

    here = plan_module.Machine.here
    try:
        plan_module.Machine.here = classmethod(lambda cls: gpu_machine())
        assert for_inference(model, trained.to_dict()).weights == "bf16"
        assert for_inference(model, None).weights == "4bit"  # an adapter from before plans: as asked
    finally:
        plan_module.Machine.here = here
    mapper = source_file("unsloth.models.loader_utils").read_text()
    assert "elif load_in_4bit and SUPPORTS_FOURBIT and lower_model_name in FLOAT_TO_INT_MAPPER" in mapper


# 2. An import never changes a decision: reading GRPOConfig's fields imports neither unsloth nor trl


def test_recipe_keys_are_checked_without_importing_unsloth_or_trl():
    code = (
        "import sys; from grpo_cli.config import load_settings; "
        "load_settings(None, {'ddp_timeout': 7200, 'top_p': 0.9}, announce=False); "
        "print(sorted(m for m in ('unsloth', 'trl', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_fields_read_from_source_are_grpo_configs():
    from trl import GRPOConfig

    from grpo_cli.config import grpo_config_fields

    assert grpo_config_fields() == {f.name for f in dataclasses.fields(GRPOConfig)}


def test_importing_unsloth_on_cuda_swaps_trls_trainer_so_plain_plans_never_import_it():
    """Unsloth's GPU import replaces trl.GRPOTrainer; under FSDP its weight sync raises. The plain plan returns
    from patch_fast_rl before any import (test_gpu_path checks that with a fake unsloth)."""
    rl = source("unsloth.models.rl", "_patch_trl_rl_trainers_impl")
    assert "trl.{RLTrainer_name} = created_module.Unsloth{RLTrainer_name}" in rl
    sync = source_file("unsloth.models.rl_replacements").read_text()
    assert "FSDP (TRL merges the adapters before it gathers the sharded weights" in sync


# 1. Plain TRL wraps the model itself


def test_plain_trl_wraps_the_adapter_itself():
    """Defect 1: with a model wrapped beforehand, TRL adds an fp32 "ref" adapter for the KL term, and under ZeRO-3
    PEFT casts the adapter to fp32 beside a 16-bit base. Given peft_config, TRL keeps the adapter's dtype under
    ZeRO-3 and computes the reference with the adapter off."""
    init = source("trl.trainer.grpo_trainer", "GRPOTrainer.__init__")
    assert "get_peft_model_kwargs['autocast_adapter_dtype'] = False" in init
    assert "model.add_adapter('ref'" in init and "elif is_peft_model(model) and args.beta != 0.0" in init
    assert "peft_config" in parameters("trl.trainer.grpo_trainer", "GRPOTrainer.__init__")
    from grpo_cli import models

    plan = resolve(settings(), gpu_machine(strategy="zero3", processes=2))
    model = object()
    assert models.add_lora(model, ModelSettings(), plan) is model  # left to TRL's peft_config (tested below)


@pytest.mark.slow
def test_the_plain_path_trains_one_adapter_in_the_bases_dtype(tmp_path, monkeypatch):
    """On CPU under a plain plan (the FSDP2 fallback's path, one process): a bf16 base, beta 0.04, one step. The
    trainer holds the default adapter only, no fp32 "ref" copy (which wrapping the model ourselves made)."""
    import torch

    from grpo_cli.train import build_trainer
    from grpo_cli.trainer import grpo_config
    from tests.fakes import tiny_llama, torch_logprob, word_tokenizer

    torch_logprob(monkeypatch)
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer), tokenizer.pad_token_id).to(torch.bfloat16)
    s = settings({"output_dir": str(tmp_path), "max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2,
                  "max_completion_length": 4, "beta": 0.04}, lora_rank=4, target_modules=["q_proj", "v_proj"])  # fmt: skip
    s.train.extra = {"save_strategy": "no"}
    plan = dataclasses.replace(resolve(s, CPU_AVX2), trainer="trl", cpu_paths=False)
    examples = [{"prompt": "w3 w4 w5", "answer": "1"}, {"prompt": "w6 w7", "answer": "2"}]
    trainer, _ = build_trainer(s, plan, model, tokenizer, [lambda completions, **kw: [1.0] * len(completions)], None,
                               grpo_config(s, plan), examples, None)  # fmt: skip
    trainer.train()
    assert list(trainer.model.peft_config) == ["default"]  # no "ref" adapter: the reference is the adapter off
    assert trainer.state.global_step == 1


# 5. The same recipe trains the same under Unsloth and plain TRL


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", {"vllm_importance_sampling_correction": False, "router_aux_loss_coef": 0.0}),
        ("dapo", {"vllm_importance_sampling_correction": False, "epsilon_high": 0.28,
                  "mask_truncated_completions": True, "router_aux_loss_coef": 0.0}),
        ("dr_grpo", {"vllm_importance_sampling_correction": False, "scale_rewards": "none",
                     "router_aux_loss_coef": 0.0}),
        ("cispo", {"vllm_importance_sampling_correction": False, "epsilon_high": 5.0, "router_aux_loss_coef": 0.0}),
    ],
)  # fmt: skip
def test_the_algorithm_is_given_explicitly_to_both_trainers(loss_type, expected):
    """Unsloth's GRPOConfig defaults these differently from TRL's (rl.py); grpo passes Unsloth's values to both, so
    FSDP and ZeRO runs train as single-GPU ones. A recipe's own value wins."""
    from grpo_cli.trainer import grpo_config

    rl = source_file("unsloth.models.rl").read_text()
    assert '"vllm_importance_sampling_correction": False,' in rl
    assert "epsilon_high = 0.28\\n" in rl and "mask_truncated_completions = True\\n" in rl
    assert "elif scale_rewards == True or scale_rewards == 'group':" in rl
    assert '"router_aux_loss_coef": 0.0,' in rl and "        epsilon_high = 5.0\\n" in rl
    s = settings({"loss_type": loss_type, "output_dir": "unused", "beta": 0.0})
    for machine in (CPU_AVX2, dataclasses.replace(CPU_AVX2, strategy="fsdp2", processes=2)):
        plan = resolve(s, machine)
        assert dict(plan.algorithm) == expected
        config = grpo_config(s, plan)
        assert {k: getattr(config, k) for k in expected} == expected
    s.train.extra = {"epsilon_high": 0.4}
    assert "epsilon_high" not in dict(resolve(s, CPU_AVX2).algorithm)


# 4. Held-out evaluation gives Unsloth's gradient checkpointing back


def test_held_out_evaluation_gives_training_back_through_unsloths_for_training():
    """Defect 4: Unsloth's generate runs for_inference when the model is not training (which clears gradient
    checkpointing) and only its for_training restores it; a plain train() does not."""
    generate = source("unsloth.models.llama", "unsloth_fast_generate")
    assert "restore_training_mode = self.training" in generate and "for_inference(self)" in generate
    assert parameters("unsloth.models.llama", "FastLlamaModel.for_training") == ["model", "use_gradient_checkpointing"]
    assert "return model._unsloth_gradient_checkpointing" in source(
        "unsloth.models._utils", "resolve_training_gradient_checkpointing"
    )


class Recording:
    """The model being trained, as held-out evaluation sees it: what is called on it, in order."""

    def __init__(self):
        self.calls = []

    def eval(self):
        self.calls.append("eval")

    def train(self):
        self.calls.append("train")

    def for_training(self, use_gradient_checkpointing=None):  # as Unsloth binds it on the model (checked above)
        self.calls.append("for_training")

    def load_lora(self, save_directory, load_tensors=False):
        self.calls.append(("load_lora", save_directory))

    @property
    def vllm_engine(self):  # vLLM's LLM, as Unsloth attaches it; sleep's signature is checked in test_vllm.py
        return types.SimpleNamespace(sleep=lambda level=1: self.calls.append(("sleep", level)))


def test_trl_puts_the_engine_to_sleep_after_each_generation_under_standby():
    """(a) What held-out evaluation restores: TRL's VLLMGeneration.generate ends with the engine asleep (level 2)
    when sleep mode is on, and Unsloth turns sleep mode on under standby and wakes the engine before any generate."""
    import inspect

    from trl.generation.vllm_generation import VLLMGeneration

    generate = inspect.getsource(VLLMGeneration.generate)
    assert "if self.enable_sleep_mode:\n                self.llm.sleep(level=2)" in generate
    assert "args.vllm_enable_sleep_mode=True" in source_file("unsloth.models.rl").read_text()
    assert "self.wake_up()" in source_file("unsloth_zoo.vllm_utils").read_text()


@pytest.mark.parametrize(
    "machine, last, standby",
    [(CPU_AVX2, "for_training", False), (gpu_machine(), "for_training", False),
     (gpu_machine(), "for_training", True), (gpu_machine(strategy="zero3", processes=2), "train", False)],
)  # fmt: skip
def test_held_out_evaluation_hands_the_model_back_to_training(
    monkeypatch, tmp_path, fake_tokenizer, machine, last, standby
):
    from grpo_cli import callbacks, generate

    class Engine:
        def __init__(self, model, tokenizer, lora_dir, plan):
            self.model, self.standby = model, plan.standby

        def follow(self, scratch):
            generate.VLLMEngine.follow(self, scratch) if plan.generator == "vllm" else None

        def rest(self):
            (generate.VLLMEngine if plan.generator == "vllm" else generate.TransformersEngine).rest(self)

        def generate(self, texts, sampling, adapter):
            return ["<answer>5</answer>"] * len(texts)

    monkeypatch.setattr(generate, "engine_for", lambda plan: Engine)
    monkeypatch.setattr(type(fake_tokenizer), "__call__", lambda self, text, **kw: {"input_ids": text.split()},
                        raising=False)  # fmt: skip
    monkeypatch.chdir(tmp_path)
    s = settings({"eval_steps": 1, "output_dir": str(tmp_path)}, vllm_standby=standby)
    plan = resolve(s, machine)
    assert plan.standby == standby
    held_out = callbacks.held_out_eval(s, plan, [{"prompt": [{"role": "user", "content": "2+3?"}], "answer": "5"}],
                                       fake_tokenizer, tmp_path)  # fmt: skip
    held_out.trainer = type("T", (), {"model": Recording()})()
    assert held_out.evaluate()["eval_accuracy"] == 1.0
    calls = held_out.trainer.model.calls
    assert calls[-1] == last and "train" not in calls[:-1]
    # under standby the engine goes back to sleep before training goes on, as TRL leaves it after its generations
    assert (("sleep", 2) in calls) == standby and (not standby or calls.index(("sleep", 2)) < len(calls) - 1)
    if plan.generator == "vllm":  # the live adapter's config goes to a scratch folder, never the working directory
        (_, scratch), *_ = calls
        assert Path(scratch).is_absolute() and not scratch.startswith(str(tmp_path))
        held_out.on_train_end(None, None, None)
        assert not Path(scratch).exists()


# 6. save-lora --gguf checks llama.cpp before loading


def test_gguf_export_checks_llama_cpp_where_unsloth_looks(monkeypatch, tmp_path):
    from grpo_cli.adapter import LLAMA_CPP_CONVERTERS, LLAMA_CPP_QUANTIZERS, check_gguf_export
    from grpo_cli.errors import GrpoError
    from tests.fakes import llama_cpp

    zoo = source_file("unsloth_zoo.llama_cpp").read_text()
    assert 'os.environ.get(\n    "UNSLOTH_LLAMA_CPP_PATH",' in zoo
    assert f"quantizer_names = {list(LLAMA_CPP_QUANTIZERS)}" in source("unsloth_zoo.llama_cpp", "check_llama_cpp")
    assert all(name in zoo for name in LLAMA_CPP_CONVERTERS)
    monkeypatch.setattr(Machine, "here", classmethod(lambda cls: gpu_machine()))
    monkeypatch.setenv("UNSLOTH_LLAMA_CPP_PATH", str(tmp_path / "none"))
    with pytest.raises(GrpoError, match=r"llama.cpp at .*none lacks an executable llama-quantize and "
                                        r"convert_hf_to_gguf.py: build llama.cpp"):  # fmt: skip
        check_gguf_export({"base_model": "qwen2.5-1.5b"}, "q5_k_m")  # a K-quant grpo does not write: Unsloth's route
    monkeypatch.setenv("UNSLOTH_LLAMA_CPP_PATH", str(llama_cpp(tmp_path / "llama.cpp")))
    check_gguf_export({"base_model": "qwen2.5-1.5b"}, "q5_k_m")


# 7. Standby keeps a memory share given, and says when Unsloth sizes it


def test_standby_keeps_a_given_memory_share(monkeypatch):
    from grpo_cli.config import load_settings

    util = source("unsloth_zoo.vllm_utils", "load_vllm")
    assert "standby_util_override = os.getenv('UNSLOTH_VLLM_STANDBY_UTIL_OVERRIDE', '0') != '0'" in util
    assert "if unsloth_vllm_standby and (not standby_util_override):" in util
    monkeypatch.delenv("UNSLOTH_VLLM_STANDBY_UTIL_OVERRIDE", raising=False)
    monkeypatch.delenv("UNSLOTH_VLLM_STANDBY", raising=False)
    from grpo_cli.config import unsloth_environment

    s = load_settings(None, {"model": "qwen2.5-1.5b", "vllm_standby": True}, announce=False)
    plan = resolve(s, gpu_machine())
    assert "standby: Unsloth sizes vLLM's memory share" in plan.line()
    unsloth_environment(s.model, plan.standby)
    assert "UNSLOTH_VLLM_STANDBY_UTIL_OVERRIDE" not in __import__("os").environ
    s = load_settings(None, {"model": "qwen2.5-1.5b", "vllm_standby": True, "gpu_memory_utilization": 0.5},
                      announce=False)  # fmt: skip
    plan = resolve(s, gpu_machine())
    assert "standby with gpu_memory_utilization 0.5 as given" in plan.line()
    unsloth_environment(s.model, plan.standby)
    assert __import__("os").environ["UNSLOTH_VLLM_STANDBY_UTIL_OVERRIDE"] == "1"


@pytest.mark.parametrize("machine", [gpu_machine(vllm=False), Machine()])
def test_standby_without_unsloths_vllm_leaves_its_allocator_alone(monkeypatch, machine):
    """Without Unsloth's vLLM (a server, no vLLM, CPU) the plan has no standby, and UNSLOTH_VLLM_STANDBY stays
    unset: set, Unsloth would give up expandable segments for nothing."""
    from grpo_cli.config import load_settings, unsloth_environment

    monkeypatch.delenv("UNSLOTH_VLLM_STANDBY", raising=False)
    s = load_settings(None, {"model": "qwen2.5-1.5b", "vllm_standby": True}, announce=False)
    plan = resolve(s, machine)
    unsloth_environment(s.model, plan.standby)
    assert not plan.standby and "UNSLOTH_VLLM_STANDBY" not in __import__("os").environ


def test_a_server_under_fsdp1_is_refused_before_loading():
    s = settings(vllm_server="http://localhost:8000")
    assert "FSDP (version 1)" in resolve(s, gpu_machine(strategy="fsdp", processes=2)).problem
    assert resolve(s, gpu_machine(strategy="fsdp2", processes=2)).problem is None


# 8. Evaluation on Unsloth's vLLM writes the live adapter's config into a scratch folder, not the working directory


def test_the_live_adapter_config_goes_to_a_scratch_folder(monkeypatch, tmp_path):
    from grpo_cli.generate import VLLMEngine

    assert parameters("unsloth_zoo.vllm_utils", "load_lora")[:2] == ["model", "save_directory"]
    assert "config.save_pretrained(save_directory)" in source("unsloth_zoo.vllm_utils", "_live_lora_config")
    asked = []
    model = type("M", (), {"load_lora": lambda self, d, load_tensors=False: asked.append((d, load_tensors))})()
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.model = model
    monkeypatch.chdir(tmp_path)
    engine.follow(tmp_path / "scratch")
    assert asked == [(str(tmp_path / "scratch"), True)]


def test_collecting_the_tests_imports_no_unsloth():
    """Importing unsloth patches trl and transformers: a test module that imported it would change what every test
    after it exercises."""
    code = (
        "import sys, pytest; pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('unsloth', 'unsloth_zoo')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-2000:]


def test_code_rewards_put_the_sandbox_in_the_plan_or_refuse_to_train(monkeypatch):
    """The rewards that run model code decide the sandbox with the plan: its mechanism in the plan line, or, where
    there is none, the one line that stops the run before any model loads."""
    from grpo_cli import sandbox

    code = Settings(data=DataSettings(rewards=["code_block", "code_tests"]))
    missing = sandbox.Sandbox.unavailable("bubblewrap (bwrap) is not installed", sandbox.Limits())
    monkeypatch.setattr(sandbox, "use", lambda mode="namespaces", limits=None: missing)
    plan = resolve(code, CPU_AVX2)
    assert plan.problem == "model code cannot run here (code rewards, python tool): bubblewrap (bwrap) is not installed"
    assert plan.sandbox is None
    works = sandbox.Sandbox("namespaces", sys.executable, ("bwrap",), sandbox.Limits(), workers=2)
    monkeypatch.setattr(sandbox, "use", lambda mode="namespaces", limits=None: works)
    plan = resolve(code, CPU_AVX2)
    assert plan.problem is None and plan.line().endswith(
        f"| sandbox: {works.line()} (fp32: this CPU has no native bf16)"
    )
    assert resolve(settings(), CPU_AVX2).sandbox is None  # no model code, no sandbox
