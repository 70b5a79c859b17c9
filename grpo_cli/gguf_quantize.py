"""llama.cpp's Q4_K_M, without llama.cpp: which type each tensor gets (llama-quantize's own rules, ported), and an
f32 GGUF file rewritten with those types, its rows quantized by libgguf, run as a script in the converter's process.

The rules are those of src/llama-quant.cpp in ggml-org/llama.cpp (commit 007dbbf3): ``tensor_allows_quantization``,
``tensor_get_category``, ``llama_tensor_get_type_impl`` for LLAMA_FTYPE_MOSTLY_Q4_K_M, ``tensor_type_fallback``,
taken for the architectures grpo exports (llama and qwen2, dense); another architecture is refused rather than
guessed at. libgguf's rows are llama.cpp's own (``ggml_quantize_chunk``, no importance matrix) byte for byte, which
tests/test_export.py checks against the llama.cpp that xllamacpp ships.

    python gguf_quantize.py SOURCE.F32.gguf OUT_FILE
"""

import re
import sys
from collections.abc import Iterable

FTYPE_Q4_K_M = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M, written to general.file_type
ARCHITECTURES = ("llama", "qwen2")  # those the port covers: dense, not falcon (whose rules differ)
BLOCK = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "F16": 1}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # tensor_type_fallback, for rows not 256 wide
# tensor_allows_quantization: 2-D tensors whose name ends in "weight", but not these
NOT_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight", "time_mix_first.weight",
    "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)  # fmt: skip


def category(name: str) -> str:
    """tensor_get_category: the first of these the name matches."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
                 "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):  # fmt: skip
        if part in name:
            return part.removesuffix(".weight")
    return "other"


def allows_quantization(name: str, n_dims: int) -> bool:
    """tensor_allows_quantization, with llama-quantize's defaults (the output tensor quantized too)."""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    return name not in ("position_embd.weight", "token_types.weight") and not any(p in name for p in NOT_QUANTIZED)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers Q4_K_M gives more bits: the first and last eighth, and every third one between (C division)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def llama_order(name: str) -> tuple[int, str]:
    """The order llama.cpp's loader keeps tensors in (weight_name_comparer): by layer, then by name."""
    found = re.match(r"blk\.(\d+)\.", name)
    return (int(found.group(1)) if found else -1, name)


def q4_k_m_types(
    tensors: Iterable[tuple[str, tuple[int, ...]]], block_count: int, seventy_b: bool = False
) -> dict[str, str | None]:
    """The type llama-quantize gives each tensor, (name, shape in ggml's order: ne[0] is the row width), of a dense
    llama or qwen2 model for Q4_K_M; None: kept as it is in the source file. ``seventy_b``: llama.cpp's
    LLM_TYPE_70B (80 layers: qwen2; llama with grouped-query attention), whose attn_v gets Q5_K for Q4_K."""
    tensors = sorted(tensors, key=lambda t: llama_order(t[0]))
    categories = {name: category(name) for name, _ in tensors}
    attn_v_like = ("attn_v", "attn_qkv", "attn_kv_b")  # category_is_attn_v
    n_attention_wv = sum(c in attn_v_like for c in categories.values())
    tied = "output" not in categories.values()  # has_tied_embeddings: no output.weight
    i_attention_wv = i_ffn_down = 0
    types: dict[str, str | None] = {}
    for name, shape in tensors:
        if not allows_quantization(name, len(shape)):
            types[name] = None
            continue
        kind, new = categories[name], "Q4_K"  # llama_ftype_get_default_type(Q4_K_M)
        # llama_tensor_get_type_impl, the branches Q4_K_M takes on a dense llama or qwen2 model
        if kind == "output" or (tied and kind == "token_embd"):
            new = "Q8_0" if shape[0] % BLOCK["Q4_K"] else "Q6_K"
        elif kind in attn_v_like:  # attn_qkv lands here first: its own later branch (Q5_K) is never reached
            if use_more_bits(i_attention_wv, n_attention_wv):
                new = "Q6_K"
            if seventy_b and new == "Q4_K":
                new = "Q5_K"
            i_attention_wv += 1
        elif kind == "ffn_down":
            if use_more_bits(i_ffn_down, block_count):  # n_ffn_down = n_layer; one per layer when dense
                new = "Q6_K"
            i_ffn_down += 1
        # tensor_type_fallback: rows that are not a whole number of the type's blocks
        if shape[0] % BLOCK[new]:
            if new not in FALLBACK:
                raise ValueError(f"{name}: rows {shape[0]} wide fit no {new} block, and llama.cpp has no fallback")
            new = FALLBACK[new] if shape[0] % BLOCK[FALLBACK[new]] == 0 else "F16"
        types[name] = new
    return types


def seventy_b(arch: str, block_count: int, head_count: int, head_count_kv: int) -> bool:
    """llama.cpp's LLM_TYPE_70B, as load_hparams sets it for these architectures."""
    return block_count == 80 and (arch == "qwen2" or head_count != head_count_kv)


def field(reader, key: str, default=None):
    found = reader.get_field(key)
    return default if found is None else found.contents()


def quantize(data, qtype):
    """A tensor's rows (numpy order, the last axis a row) as ``qtype``'s bytes, by libgguf, in chunks over the CPU's
    cores as llama-quantize splits them (32 * 512 weights at least)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import libgguf
    import numpy as np

    rows = data.reshape(-1, data.shape[-1])
    out = np.empty((rows.shape[0], libgguf.row_size(qtype, rows.shape[1])), dtype=np.uint8)
    step = max(1, 32 * 512 // rows.shape[1])

    def chunk(start: int) -> None:
        part = np.ascontiguousarray(rows[start : start + step], dtype=np.float32)
        out[start : start + step] = libgguf.quantize_rows(part, qtype).view(np.uint8).reshape(len(part), -1)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(chunk, range(0, rows.shape[0], step)))
    return out.reshape(*data.shape[:-1], out.shape[-1])


def requantize(source: str, out_file: str) -> None:
    """SOURCE (all weights f32, as the converter wrote them) to OUT_FILE in Q4_K_M: every key kept as it was
    (tokenizer, chat template), general.file_type set, each tensor in the type llama-quantize would give it."""
    import gguf
    import libgguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    arch = field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch not in ARCHITECTURES:
        raise SystemExit(f"q4_k_m: llama.cpp's mix is ported here for {', '.join(ARCHITECTURES)}, not {arch}")
    if field(reader, f"{arch}.expert_count", 0) > 1:
        raise SystemExit("q4_k_m: llama.cpp's mix is ported here for dense models, not a mixture of experts")
    blocks = field(reader, f"{arch}.block_count")
    heads, heads_kv = field(reader, f"{arch}.attention.head_count"), field(reader, f"{arch}.attention.head_count_kv")
    shapes = [(t.name, tuple(int(n) for n in t.shape)) for t in reader.tensors]
    types = q4_k_m_types(shapes, blocks, seventy_b(arch, blocks, heads, heads_kv if heads_kv is not None else heads))

    writer = gguf.GGUFWriter(out_file, arch=arch, endianess=reader.endianess)
    alignment = field(reader, gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue  # the writer's own
        value = f.contents()
        if f.name == gguf.Keys.General.FILE_TYPE:
            value = FTYPE_Q4_K_M
        elif f.name == gguf.Keys.General.QUANTIZATION_VERSION:
            value = gguf.GGML_QUANT_VERSION
        kind = f.types[0]
        writer.add_key_value(f.name, value, kind, sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)

    planned = []
    for tensor in reader.tensors:
        new = types[tensor.name]
        if new is None:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)  # fmt: skip
            planned.append((tensor, None))
            continue
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise SystemExit(f"{source}: {tensor.name} is {tensor.tensor_type.name}, not F32 as the converter writes")
        qtype = libgguf.GGMLQuantizationType[new]
        width = int(tensor.shape[0])
        byte_shape = (*tensor.data.shape[:-1], libgguf.row_size(qtype, width))
        writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               gguf.GGMLQuantizationType[new])  # fmt: skip
        planned.append((tensor, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, qtype in planned:
        data = tensor.data if qtype is None else quantize(tensor.data, qtype)
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    counts: dict[str, int] = {}
    for new in types.values():
        counts[new or "kept"] = counts.get(new or "kept", 0) + 1
    print("q4_k_m: " + ", ".join(f"{n} {name}" for name, n in sorted(counts.items())), file=sys.stderr)


if __name__ == "__main__":
    requantize(*sys.argv[1:3])
