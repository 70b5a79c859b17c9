from typer.testing import CliRunner

from grpo_cli import doctor
from grpo_cli.cli import app


def fake_versions(monkeypatch, **overrides):
    real = doctor.version
    monkeypatch.setattr(doctor, "version", lambda name: overrides.get(name, real(name)))


def test_doctor_flags_known_bad_combinations(monkeypatch):
    fake_versions(monkeypatch, transformers="5.18.0", torchvision="0.28.0", unsloth=None)
    facts, problems, _ = doctor.diagnose()
    assert dict(facts)["train backend"] == "cannot train"
    assert any(
        "transformers 5.18.0 is newer than unsloth 2026.10.9 supports: pip install transformers==5.17.0" in p
        for p in problems
    )
    assert any("unsloth is not installed" in p for p in problems)
    assert any("torchvision 0.28.0 is a CUDA build" in p for p in problems)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 1 and "problem" in result.output


def test_doctor_reports_this_machine():
    import torch

    facts, problems, _ = doctor.diagnose()
    facts = dict(facts)
    assert facts["torch"] == torch.__version__ and not problems
    if not torch.cuda.is_available():
        assert facts["GPU"] == "none" and facts["train backend"] == "Unsloth CPU + transformers generate"
