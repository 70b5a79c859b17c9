from typer.testing import CliRunner

from grpo_cli import doctor
from grpo_cli.cli import app


def fake_versions(monkeypatch, **overrides):
    real = doctor.version
    monkeypatch.setattr(doctor, "version", lambda name: overrides.get(name, real(name)))


def test_doctor_flags_known_bad_combinations(monkeypatch):
    fake_versions(monkeypatch, transformers="5.18.0", torchvision="0.28.0", unsloth=None)
    facts, problems, _ = doctor.diagnose()
    assert dict(facts)["plan"] == "cannot train"
    assert any(
        "transformers 5.18.0 is newer than unsloth 2026.10.9 supports: pip install transformers==5.17.0" in p
        for p in problems
    )
    assert any("unsloth is not installed" in p for p in problems)
    assert any("torchvision 0.28.0 is a CUDA build" in p for p in problems)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 1 and "problem" in result.output


def test_doctor_shows_the_plan_train_would_resolve(monkeypatch):
    import torch

    from grpo_cli import plan
    from grpo_cli.config import Settings

    monkeypatch.setattr(plan.Machine, "here", classmethod(lambda cls: plan.Machine(cpu_kind="avx2")))
    facts = dict(doctor.diagnose()[0])
    assert facts["torch"] == torch.__version__
    assert facts["plan"] == plan.resolve(Settings()).line().removeprefix("Plan: ")
    assert facts["plan"].startswith("Unsloth on CPU (avx2) | generation: transformers generate | fp32 weights")


def test_doctor_vllm_outside_trls_window_and_off_torch(monkeypatch):
    from packaging.requirements import Requirement

    real = doctor.requirement
    monkeypatch.setattr(  # vLLM 0.33.0 is built for torch 2.14.0
        doctor,
        "requirement",
        lambda package, name, extra=None: (
            Requirement("torch==2.14.0") if package == "vllm" else real(package, name, extra)
        ),  # fmt: skip
    )
    problems = doctor.gpu_stack({"vllm": "0.33.0", "trl": "1.15.0", "torch": "2.13.0+cpu", "bitsandbytes": None}, False)
    assert problems == [
        "vllm 0.33.0 is outside what trl 1.15.0 supports (<=0.31.0,>=0.21.0): pip install vllm==0.31.0",
        "vllm 0.33.0 is built for torch ==2.14.0, not the installed 2.13.0+cpu: pip install 'torch==2.14.0' "
        "(make install does), or the vllm built for this torch",
    ]
    monkeypatch.setattr(doctor, "requirement", lambda p, n, extra=None: Requirement("torch==2.13.0")
                        if p == "vllm" else real(p, n, extra))  # fmt: skip
    assert doctor.gpu_stack({"vllm": "0.31.0", "trl": "1.15.0", "torch": "2.13.0", "bitsandbytes": None}, False) == []


def test_doctor_driver_too_old_and_bitsandbytes_library(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(doctor, "cuda_driver_version", lambda: (12, 8))
    monkeypatch.setenv("BNB_CUDA_VERSION", "999")
    versions = {"vllm": None, "trl": "1.15.0", "torch": "2.13.0", "bitsandbytes": doctor.version("bitsandbytes")}
    driver, bnb = doctor.gpu_stack(versions, True)
    assert driver == (
        "the NVIDIA driver supports CUDA up to 12.8, torch 2.13.0 is built for CUDA 13.0: update the driver to 580 "
        "or newer, or install a torch built for CUDA 12"
    )
    assert bnb.startswith("bitsandbytes 0.50.2 has no libbitsandbytes_cuda999.so for CUDA 13.0: pip install")
    monkeypatch.delenv("BNB_CUDA_VERSION")  # the installed wheel carries CUDA 13.0's library
    monkeypatch.setattr(doctor, "cuda_driver_version", lambda: (13, 0))
    assert doctor.gpu_stack(versions, True) == []
