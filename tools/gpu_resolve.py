"""Show that the GPU install resolves, without a GPU: pip's dry run for Linux x86_64 wheels.

    python tools/gpu_resolve.py            # Python 3.11 and 3.12; reports under .gpu-resolve/

For each Python it resolves `grpo-cli[gpu,dev]` (built here as a wheel) the way `make install` does on a GPU
machine, prints the versions that matter, then checks that every run-time requirement of unsloth and unsloth_zoo
(installed after with --no-deps) is met by that set. Exit 1 if anything does not resolve or is unmet.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# glibc 2.35 (Ubuntu 22.04) and older: vLLM's and torch's needs ship wheels for several of these
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"
]  # fmt: skip
SHOWN = ["torch", "torchvision", "vllm", "xformers", "bitsandbytes", "trl", "transformers", "peft", "triton"]
NO_DEPS = ["unsloth==2026.10.9", "unsloth_zoo==2026.10.9"]
# unsloth's metadata asks for these, which no training run imports: its web studio and CLI, and a certifi newer
# than some registries serve (any certifi works for downloads)
NOT_AT_RUN_TIME = {"certifi", "diffusers", "json5", "nest-asyncio", "structlog", "pydantic", "click"}


def pip(*args: str, no_links: str) -> None:
    # the registry's wheels only: a local folder of wheels (a CPU torch, say) would stand in for the CUDA build
    env = os.environ | {"PIP_FIND_LINKS": no_links}
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True, env=env)


def target(python: str) -> list[str]:
    return ["--only-binary=:all:", "--implementation", "cp", "--python-version", python] + [
        f"--platform={p}" for p in PLATFORMS
    ]


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def check(python: str, out: Path, project_wheel: Path, unsloth_wheels: list[Path]) -> list[str]:
    report = out / f"py{python}.json"
    pip("install", "-q", "--dry-run", "--ignore-installed", *target(python), "--target", str(out / "target"),
        "--report", str(report),
        f"{project_wheel}[gpu,dev]", no_links=str(out / "no-links"))  # fmt: skip
    installed = {canonicalize_name(spec.split("==")[0]): spec.split("==")[1] for spec in NO_DEPS} | {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    print(f"Python {python}: {len(installed)} packages; " + ", ".join(f"{n} {installed.get(n, '-')}" for n in SHOWN))
    env = default_environment() | {
        "python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
        "platform_system": "Linux", "platform_machine": "x86_64", "extra": "",
    }  # fmt: skip
    unmet = []
    for wheel in unsloth_wheels:
        for line in requirements(wheel):
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if (req.marker and not req.marker.evaluate(env)) or name in NOT_AT_RUN_TIME:
                continue
            if name not in installed or not req.specifier.contains(installed[name], prereleases=True):
                unmet.append(f"{wheel.name.split('-')[0]} needs {line.split(';')[0]}, resolved {installed.get(name)}")
    return unmet


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", nargs="+", default=["3.11", "3.12"])
    p.add_argument("--out", type=Path, default=ROOT / ".gpu-resolve")
    args = p.parse_args()
    (args.out / "no-links").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip("wheel", "-q", "--no-deps", "-w", tmp, str(ROOT), no_links=str(args.out / "no-links"))
        (project_wheel,) = Path(tmp).glob("grpo_cli-*.whl")
        pip("download", "-q", "--no-deps", *target("3.12"), "-d", tmp, *NO_DEPS, no_links=str(args.out / "no-links"))
        unsloth_wheels = sorted(Path(tmp).glob("unsloth*.whl"))
        unmet = [u for python in args.python for u in check(python, args.out, project_wheel, unsloth_wheels)]
    for line in unmet:
        print(f"unmet: {line}")
    print("GPU install resolves" if not unmet else "GPU install does NOT resolve", f"(reports in {args.out})")
    return 1 if unmet else 0


if __name__ == "__main__":
    sys.exit(main())
