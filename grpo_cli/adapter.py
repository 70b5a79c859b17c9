"""LoRA adapters on disk: atomic writes, and a manifest (grpo.json) that says how to use them."""

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from grpo_cli import export
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


def check_out_dir(out_dir: Path, force: bool) -> None:
    """A new or empty directory, or one --force may replace; never a file, which --force would not replace either."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GrpoError(f"{out_dir} is a file, not a directory: give a new or empty directory for the output")
    if occupied(out_dir) and not force:
        raise GrpoError(f"{out_dir} exists and is not empty: choose another directory or pass --force")
    where = out_dir.absolute().parent  # the output is written beside it, then renamed
    while not where.exists():
        where = where.parent
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        kind = "a file" if not where.is_dir() else "not writable"
        raise GrpoError(
            f"{out_dir} cannot be written: {where} is {kind}: give a directory in a folder you can write to"
        )


def publish(out_dir: Path, write, force: bool = False) -> Path:
    """Call ``write(tmp_dir)`` and move the result to ``out_dir`` in one rename.

    A non-empty ``out_dir`` is refused unless ``force``; then it is replaced only after the new
    content is complete.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
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


HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the embedded model, as the Hub names it


def model_card(manifest: dict) -> str:
    """The adapter's README.md in the Hub's format: YAML front matter, then what it is and how to load it."""
    from huggingface_hub import ModelCardData

    from grpo_cli.models import ALIASES

    base = HUB_IDS.get(manifest["base_model"]) or ALIASES.get(manifest["base_model"], manifest["base_model"])
    data = ModelCardData(base_model=base, library_name="peft", pipeline_tag="text-generation",
                         tags=["grpo", "trl", "unsloth", "lora"])  # fmt: skip
    settings = manifest.get("settings", {})
    rank = settings.get("model", {}).get("lora_rank", 16)
    from rewards import split_weight

    rewards = "\n".join("| `{}` | {:g} |".format(*split_weight(spec)) for spec in manifest.get("rewards", []))
    recipe = "\n".join(
        f"{key}: {json.dumps(value)}"
        for section in ("model", "data", "train")
        for key, value in settings.get(section, {}).items()
        if key not in ("system_prompt", "extra")
    )
    evaluation = ""
    if manifest.get("eval"):
        rows = "\n".join(f"| {k} | {v['base']:.3f} | {v['adapter']:.3f} |" for k, v in manifest["eval"].items())
        evaluation = f"\n## Held-out evaluation\n\n| metric | base | adapter |\n| --- | --- | --- |\n{rows}\n"
    reward = manifest.get("last_reward")
    tools = ""
    if manifest.get("tools"):
        t, rounds = manifest["tools"], manifest["tools"]["max_tool_calling_iterations"]
        listed = "\n".join(f"- `{name}`" for name in t["tools"])
        tools = (
            f"\n## Tools\n\nTrained calling these tools, at most {rounds} round{'s' * (rounds != 1)} of calls a "
            f"completion ({t.get('template', '')}). `grpo infer --lora ADAPTER_DIR` and `grpo eval` offer them "
            f"again; the prompt must show their schemas, with the same chat template.\n\n{listed}\n"
        )
    return f"""---
{data.to_yaml()}
---

# GRPO LoRA adapter for {base}

A LoRA adapter trained with grpo (GRPO with TRL's `GRPOTrainer`, Unsloth and PEFT) for {manifest.get("step", "?")} steps; mean reward at the last step: {"?" if reward is None else f"{reward:.3f}"}.
Prompt it with the system prompt below, as it was trained.

## System prompt

```
{manifest.get("system_prompt", "").strip()}
```

## Rewards

| reward | weight |
| --- | --- |
{rewards}
{tools}{evaluation}
## Recipe

```yaml
{recipe}
```

## Use

With grpo, side by side with the base model:

```bash
grpo infer --lora ADAPTER_DIR --prompt "What is 7 + 5?"
```

With PEFT:

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("ADAPTER_DIR")
tokenizer = AutoTokenizer.from_pretrained("{base}")
```

With vLLM:

```python
from vllm import LLM
from vllm.lora.request import LoRARequest

llm = LLM(model="{base}", enable_lora=True, max_lora_rank={rank})
outputs = llm.generate(prompts, lora_request=LoRARequest("adapter", 1, "ADAPTER_DIR"))
```
"""


def save_adapter(model, out_dir: Path, manifest: dict, force: bool = False, state_dict: dict | None = None) -> Path:
    """``state_dict``: the weights gathered from every process where a strategy shards them (FSDP, ZeRO-3)."""

    def write(tmp: Path) -> None:
        # the trained adapter only: TRL keeps a frozen copy named "ref" for the KL term
        model.save_pretrained(tmp, selected_adapters=["default"], state_dict=state_dict)
        write_json(tmp / MANIFEST, manifest)
        (tmp / "README.md").write_text(model_card(manifest))

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


def push(out_dir: Path, repo: str) -> str:
    """Upload a written folder to the Hub in one commit (all of it or nothing); the token from the usual places."""
    from huggingface_hub import HfApi, constants

    later = f"{out_dir} is saved: upload it later with `hf upload {repo} {out_dir}`"
    if constants.HF_HUB_OFFLINE:
        raise GrpoError(f"--push-to-hub {repo}: the hub is offline here (HF_HUB_OFFLINE is set); {later}")
    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        info = api.upload_folder(folder_path=str(out_dir), repo_id=repo, commit_message="Upload a grpo adapter")
    except Exception as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise GrpoError(
            f"could not push to {repo} ({first}): check the network and your token (`hf auth login`); {later}"
        ) from exc
    return str(getattr(info, "commit_url", repo))


def save_lora(
    source: Path,
    out_dir: Path,
    merged: bool = False,
    gguf: str | None = None,
    force: bool = False,
    push_to_hub: str | None = None,
) -> Path:
    """Write an adapter (or a merged model, or a GGUF file) with its manifest, all or nothing; then upload it to
    the Hub when asked."""
    if push_to_hub is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", push_to_hub):
        raise GrpoError(f"--push-to-hub {push_to_hub!r}: give a Hub repository as ORG/NAME")
    written = _save_lora(source, out_dir, merged, gguf, force)
    if push_to_hub:
        print(f"Pushed to {push(written, push_to_hub)}")
    return written


LLAMA_CPP_QUANTIZERS = ("llama-quantize", "quantize")  # as unsloth_zoo.llama_cpp.check_llama_cpp looks for them
LLAMA_CPP_CONVERTERS = ("convert_hf_to_gguf.py", "convert-hf-to-gguf.py")


def llama_cpp_dir() -> Path:
    """Where Unsloth's GGUF export looks for llama.cpp: UNSLOTH_LLAMA_CPP_PATH, else ~/.unsloth/llama.cpp."""
    return Path(os.environ.get("UNSLOTH_LLAMA_CPP_PATH") or Path.home() / ".unsloth" / "llama.cpp").expanduser()


# The types Unsloth's export writes with llama.cpp's quantizer beyond the converter's own (unsloth.save.ALLOWED_QUANTS)
UNSLOTH_GGUF_TYPES = (
    "q2_k", "q2_k_l", "q3_k_l", "q3_k_m", "q3_k_s", "q3_k_xs", "q4_0", "q4_1", "q4_k", "q4_k_s", "q5_0",
    "q5_1", "q5_k", "q5_k_m", "q5_k_s", "q6_k",
)  # fmt: skip


def check_gguf_export(manifest: dict, gguf: str) -> None:
    """Before any model loads. f16, bf16, q8_0 and q4_k_m anywhere (grpo_cli/export.py); the others through Unsloth's
    GPU export and a llama.cpp it can use. Without one Unsloth would download and build it after the 16-bit merge,
    which needs the network and a compiler."""
    from grpo_cli.config import ModelSettings
    from grpo_cli.plan import for_inference

    here = ", ".join(export.GGUF_TYPES)
    if gguf not in UNSLOTH_GGUF_TYPES:
        raise GrpoError(
            f"--gguf {gguf} is not a GGUF type grpo writes: use {here} (any machine), or on a GPU with llama.cpp "
            "built another K-quant such as q5_k_m"
        )
    if not for_inference(ModelSettings(model=manifest["base_model"]), manifest.get("plan")).cuda:
        raise GrpoError(
            f"--gguf {gguf} needs llama.cpp's quantizer, which Unsloth's GPU export runs: here, use --gguf {here}"
        )
    folder = llama_cpp_dir()
    quantizer = any(os.access(folder / name, os.X_OK) for name in LLAMA_CPP_QUANTIZERS)
    converter = any((folder / name).is_file() for name in LLAMA_CPP_CONVERTERS)
    if not (quantizer and converter):
        missing = " and ".join(
            [f"an executable {LLAMA_CPP_QUANTIZERS[0]}"] * (not quantizer) + [LLAMA_CPP_CONVERTERS[0]] * (not converter)
        )
        raise GrpoError(
            f"--gguf {gguf}: llama.cpp at {folder} lacks {missing}: build llama.cpp, copy build/bin/llama-quantize "
            f"into its root, and set UNSLOTH_LLAMA_CPP_PATH to that folder (or use --gguf {here}, which needs neither)"
        )


def _save_lora(source: Path, out_dir: Path, merged: bool, gguf: str | None, force: bool) -> Path:
    from grpo_cli.plan import for_inference

    adapter, manifest = find_adapter(source)
    if not manifest:
        raise GrpoError(f"no {MANIFEST} found for {source}: give a directory written by `grpo train`")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    if gguf is not None and not gguf.strip():
        raise GrpoError(f"--gguf needs a type: {', '.join(export.GGUF_TYPES)}")
    if merged and gguf:
        raise GrpoError("--merged and --gguf write different things: give one (--gguf merges the adapter itself)")
    if gguf:
        gguf = gguf.lower()
        if gguf in export.GGUF_TYPES:
            # llama.cpp's converter (and for q4_k_m libgguf, and a base its mix is ported for), present; the
            # Modelfile writable; room for the merged model and the file
            folder = export.check_converter()
            export.check_quantizer(gguf)
            export.check_architecture(manifest["base_model"], gguf)
            export.check_modelfile(manifest)
            merged_bytes = 2 if for_inference(settings_of(manifest), manifest.get("plan")).cuda else 4
            export.check_disk(out_dir, gguf, export.base_weights(manifest["base_model"]), merged_bytes)
        else:
            check_gguf_export(manifest, gguf)
    if not (merged or gguf):

        def write(tmp: Path) -> None:
            for name in ADAPTER_FILES:
                shutil.copy2(adapter / name, tmp / name)
            write_json(tmp / MANIFEST, manifest)
            (tmp / "README.md").write_text(model_card(manifest))

        return publish(out_dir, write, force)

    # Merged 16-bit weights, or GGUF from them: the base unquantized, with no vLLM engine beside it; unsloth is
    # imported first (load_model, or from_pretrained here), then PEFT
    from grpo_cli.models import load_model

    settings = settings_of(manifest)
    if gguf and gguf not in export.GGUF_TYPES:
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
            (tmp / "Modelfile").write_text(export.modelfile(manifest, written[0].name))
            write_json(tmp / MANIFEST, manifest | {"format": f"gguf {gguf}"})

        return publish(out_dir, write, force)

    model, tokenizer = load_model(settings, for_inference(settings))
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    if gguf:

        def write(tmp: Path) -> None:
            # the merged model as it computed (fp32 on CPU), converted once into the file, then dropped; q4_k_m:
            # converted to f32, then each tensor requantized in llama.cpp's mix
            merged = tmp / ".merged"
            model.save_pretrained(merged)
            tokenizer.save_pretrained(merged)
            name = export.file_name(gguf)
            if gguf in export.REQUANTIZED:
                first = tmp / f".merged.{export.REQUANTIZED[gguf].upper()}.gguf"
                export.convert(merged, first, export.REQUANTIZED[gguf], manifest, folder)
                shutil.rmtree(merged)
                export.requantize(first, tmp / name, gguf, folder)
                first.unlink()
            else:
                export.convert(merged, tmp / name, gguf, manifest, folder)
                shutil.rmtree(merged)
            (tmp / "Modelfile").write_text(export.modelfile(manifest, name))
            write_json(tmp / MANIFEST, manifest | {"format": f"gguf {gguf}"})
    else:
        dtype = export.merged_dtype(manifest)
        model = model.to(dtype)  # 16-bit as said, whatever the run computed in (fp32 on CPU)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(
                tmp / MANIFEST, manifest | {"format": "merged 16-bit", "dtype": str(dtype).removeprefix("torch.")}
            )

    return publish(out_dir, write, force)


def settings_of(manifest: dict):
    """The base as a merge loads it: unquantized, with no vLLM engine."""
    from grpo_cli.config import ModelSettings

    return ModelSettings(model=manifest["base_model"], fast_inference=False, load_in_4bit=False)
