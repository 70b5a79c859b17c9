"""LoRA adapters on disk: atomic writes, and a manifest (grpo.json) that says how to use them."""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from grpo_cli.errors import GrpoError

MANIFEST = "grpo.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_VOLATILE = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "use_cache",
    "unsloth_version",
    "unsloth_fixed",
}


def occupied(path: Path) -> bool:
    """A directory that exists and holds something: never written over without being asked."""
    return Path(path).is_dir() and any(Path(path).iterdir())


def fingerprint(config) -> str:
    """A short hash of a model config's architecture, stable across dtype and quantization.

    >>> from types import SimpleNamespace as C
    >>> fingerprint(C(to_dict=lambda: {"hidden_size": 8, "dtype": "bf16"})) == fingerprint(C(to_dict=lambda: {"hidden_size": 8}))
    True
    """
    kept = {k: v for k, v in sorted(config.to_dict().items()) if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def check_adapter_dir(directory: Path) -> None:
    directory = Path(directory)
    if not directory.is_dir():
        raise GrpoError(
            f"adapter directory {directory} does not exist: give the output of `grpo train` or `grpo save-lora`"
        )
    missing = [f for f in ADAPTER_FILES if not (directory / f).is_file()]
    if missing:
        raise GrpoError(
            f"{directory} is not a LoRA adapter (missing {', '.join(missing)}): give a directory written by `grpo save-lora`"
        )


def publish(out_dir: Path, write, force: bool = False) -> Path:
    """Call ``write(tmp_dir)`` and move the result to ``out_dir`` in one rename.

    A non-empty ``out_dir`` is refused unless ``force``; then it is replaced only after the new
    content is complete.
    """
    out_dir = Path(out_dir)
    if occupied(out_dir) and not force:
        raise GrpoError(f"{out_dir} exists and is not empty: choose another directory or pass --force")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    tmp.chmod(0o755)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return out_dir


def save_adapter(model, out_dir: Path, manifest: dict, force: bool = False) -> Path:
    def write(tmp: Path) -> None:
        # the trained adapter only: TRL keeps a frozen copy named "ref" for the KL term
        model.save_pretrained(tmp, selected_adapters=["default"])
        write_json(tmp / MANIFEST, manifest)

    return publish(out_dir, write, force)


def find_adapter(source: Path) -> tuple[Path, dict]:
    """A run directory, one of its checkpoint-N directories, or an adapter -> (adapter dir, manifest or {})."""
    source = Path(source)
    if not source.is_dir():
        raise GrpoError(
            f"{source} does not exist: give an adapter, a training output directory or one of its checkpoint-N directories"
        )
    adapter = source / "adapter" if (source / "adapter").is_dir() else source
    check_adapter_dir(adapter)
    manifest = read_manifest(adapter) or read_manifest(source) or read_manifest(source.parent)
    state = adapter / "trainer_state.json"
    if manifest and state.is_file():  # a checkpoint: its own step and reward, not the run's last
        history = json.loads(state.read_text())
        rewards = [h["reward"] for h in history.get("log_history", []) if "reward" in h]
        manifest = manifest | {"step": history.get("global_step"), "last_reward": rewards[-1] if rewards else None}
    return adapter, manifest


def save_lora(source: Path, out_dir: Path, merged: bool = False, gguf: str | None = None, force: bool = False) -> Path:
    """Write an adapter (or a merged model, or a GGUF file) with its manifest, all or nothing."""
    adapter, manifest = find_adapter(source)
    if not manifest:
        raise GrpoError(f"no {MANIFEST} found for {source}: give a directory written by `grpo train`")
    out_dir = Path(out_dir)
    if occupied(out_dir) and not force:
        raise GrpoError(f"{out_dir} exists and is not empty: choose another directory or pass --force")
    if gguf:
        from grpo_cli.models import cuda_available

        if not cuda_available():
            raise GrpoError(
                "--gguf needs Unsloth's GPU backend (it builds llama.cpp): here, write --merged and convert "
                "that directory with llama.cpp's convert_hf_to_gguf.py"
            )
    if not (merged or gguf):

        def write(tmp: Path) -> None:
            for name in ADAPTER_FILES:
                shutil.copy2(adapter / name, tmp / name)
            write_json(tmp / MANIFEST, manifest)

        return publish(out_dir, write, force)

    # Merged 16-bit weights, or GGUF from them: the base unquantized, with no vLLM engine beside it; unsloth is
    # imported first (load_model, or from_pretrained here), then PEFT
    from grpo_cli.config import ModelSettings
    from grpo_cli.models import load_model

    settings = ModelSettings(model=manifest["base_model"], fast_inference=False)
    if gguf:
        from unsloth import FastLanguageModel

        # Unsloth's GGUF export merges the adapter itself: it needs the PEFT model that from_pretrained returns for an
        # adapter directory (save_pretrained_gguf looked up through a PeftModel of ours lands on the bare base)
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(adapter), max_seq_length=settings.max_seq_length, load_in_4bit=False, fast_inference=False
        )

        def write(tmp: Path) -> None:
            # Unsloth writes the merged model to the directory given and the GGUF files to a sibling `<dir>_gguf`:
            # both inside tmp; only the .gguf files are kept
            merged = tmp / "merged"
            model.save_pretrained_gguf(str(merged), tokenizer, quantization_method=gguf)
            written = sorted(tmp.glob("merged_gguf/*.gguf"))
            if not written:
                raise GrpoError(f"Unsloth's GGUF export wrote no .gguf file for {gguf}: see its output above")
            for path in written:
                path.rename(tmp / path.name)
            for path in tmp.iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
            write_json(tmp / MANIFEST, manifest | {"format": f"gguf {gguf}"})
    else:
        model, tokenizer = load_model(settings, load_in_4bit=False)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / MANIFEST, manifest | {"format": "merged 16-bit"})

    return publish(out_dir, write, force)
