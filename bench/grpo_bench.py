"""grpo's path vs plain TRL GRPOTrainer + PEFT + transformers, on the same GRPO settings.

    python bench/grpo_bench.py                  # alternate both engines, print the table
    python bench/grpo_bench.py --engine plain   # one run, one JSON line (what the driver calls)
    python bench/grpo_bench.py --arch llama3.1-8b --four-bit --generations 8 --completion-length 256 --rounds 1
                                                # a real architecture at its real size, random weights (GPU)

Each run is its own process: importing unsloth patches TRL, which would leak into a plain run.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["grpo", "plain"], help="one run of one engine (default: the comparison)")
    p.add_argument("--model", default="smollm2-135m", help="a model name grpo resolves (default: the embedded one)")
    p.add_argument(
        "--arch", choices=sorted(ARCHS), help="a real architecture at its real size, random weights (built once)"
    )
    p.add_argument("--layers", type=int, help="with --arch: fewer layers (a quick check of the bench itself)")
    p.add_argument("--steps", type=int, default=6, help="steps per run; the first is warm-up and not counted")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both engines")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=1, help="prompts per step")
    p.add_argument("--completion-length", type=int, default=48)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument(
        "--four-bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bitsandbytes 4-bit base for both (default: grpo's choice, 4-bit on GPU, 16-bit on CPU)",
    )
    p.add_argument(
        "--plain-dtype",
        choices=["bf16", "fp32"],
        default=None,
        help="plain's compute dtype (default: bf16 on GPU, fp32 on CPU, as transformers loads it there)",
    )
    p.add_argument("--seed", type=int, default=3407)
    return p.parse_args(argv)


# Published configurations; the weights are random, which is all a speed and memory figure needs
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
ARCHS = {
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6),
    "llama3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                        max_position_embeddings=131072, rope_theta=5e5, rms_norm_eps=1e-5,
                        rope_scaling=LLAMA3_ROPE | {"factor": 32.0}),
    "llama3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                        max_position_embeddings=131072, rope_theta=5e5, rms_norm_eps=1e-5,
                        rope_scaling=LLAMA3_ROPE | {"factor": 8.0}),
}  # fmt: skip


def build_arch(name: str, layers: int | None = None) -> str:
    """A model directory for ``name``: its configuration, random bf16 weights, and the embedded model's tokenizer
    grown to the architecture's vocabulary (sampled ids past the tokenizer's own must still decode). Built once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from grpo_cli.models import cache_dir, resolve_model

    out = cache_dir() / "bench" / (name + (f"-{layers}l" if layers else ""))
    if (out / "config.json").is_file():
        return str(out)
    spec = ARCHS[name] | ({"num_hidden_layers": layers} if layers else {})
    config = AutoConfig.for_model(**spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    tokenizer.add_tokens([f"<bench_{i}>" for i in range(config.vocab_size - len(tokenizer))])
    model.generation_config.eos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name(f".{out.name}-tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


def torch_chunked_logprob():
    """A pure-torch stand-in for TRL's Triton `_ChunkedLogProbFunction` (None without Triton, so on CPU)."""
    import torch.nn.functional as F

    class TorchLogProb:
        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
            logits = F.linear(hidden, weight, bias).float() * logit_scale
            if softcap:
                logits = softcap * (logits / softcap).tanh()
            logp = (logits / temperature).log_softmax(-1)
            picked = logp.gather(-1, targets[:, None]).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
            sq = (2 * logp).logsumexp(-1) if "log_sum_sq_probs" in outputs else None
            mean = logits.mean(-1) if "mean_logits" in outputs else None
            top1 = logits.argmax(-1) == targets if "is_top1" in outputs else None
            return picked, entropy, sq, mean, top1

    return TorchLogProb


def load(engine, args):
    from grpo_cli.config import ModelSettings

    settings = ModelSettings(model=args.model, lora_rank=args.lora_rank, load_in_4bit=args.four_bit, max_seq_length=512)
    if engine == "grpo":
        from grpo_cli import models

        model, tokenizer = models.load_model(settings)
        precision = "4-bit" if getattr(model, "is_loaded_in_4bit", False) else str(model.dtype).replace("torch.", "")
        engine = ", vLLM generation" if hasattr(model, "vllm_engine") else ""
        return models.add_lora(model, settings), tokenizer, f"Unsloth, {precision}{engine}"
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl.trainer import utils

    from grpo_cli.models import resolve_model

    note = "plain"
    if utils._ChunkedLogProbFunction is None:
        utils._ChunkedLogProbFunction = torch_chunked_logprob()
        note = "plain, pure-torch _ChunkedLogProbFunction (TRL's needs Triton)"
    path = resolve_model(args.model)
    dtype = (
        torch.bfloat16
        if (args.plain_dtype or ("bf16" if torch.cuda.is_available() else "fp32")) == "bf16"
        else torch.float32
    )
    four_bit = torch.cuda.is_available() if args.four_bit is None else args.four_bit
    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        if four_bit
        else None
    )
    note += f", {'4-bit, ' if four_bit else ''}{dtype}".replace("torch.", "")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=quant, device_map="auto" if torch.cuda.is_available() else None
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    lora = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), tokenizer, note


def one_run(args) -> dict:
    if args.engine == "grpo":
        import unsloth  # noqa: F401  (first, as in grpo)
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_cli.data import arithmetic_problems
    from rewards import REWARDS

    model, tokenizer, note = load(args.engine, args)
    generation_seconds = []

    def timed(generate):
        def run(*a, **kw):
            start = time.perf_counter()
            out = generate(*a, **kw)
            generation_seconds.append(time.perf_counter() - start)
            return out

        return run

    model.generate = timed(model.generate)
    llm = getattr(model, "vllm_engine", None)  # grpo on a GPU with vLLM: Unsloth's engine generates
    if llm is not None:
        llm.generate = timed(llm.generate)
    rows = [
        {"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
        for r in arithmetic_problems("train", 200)
    ]
    steps = []

    class Record(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "step_time" in logs:
                completions = args.generations * args.prompts
                steps.append({"step_time": logs["step_time"], "generation": sum(generation_seconds),
                              "logp_grad": sum(logp_seconds[True]), "logp_nograd": sum(logp_seconds[False]),
                              "completion_tokens": logs["completions/mean_length"] * completions})  # fmt: skip
                generation_seconds.clear()
                logp_seconds[True].clear()
                logp_seconds[False].clear()

    cpu = not torch.cuda.is_available()
    same = dict(output_dir="/tmp/grpo-bench", max_steps=args.steps, per_device_train_batch_size=args.generations * args.prompts,
                num_generations=args.generations, max_completion_length=args.completion_length, learning_rate=1e-5,
                beta=0.0, logging_steps=1, report_to="none", seed=args.seed, temperature=1.0)  # fmt: skip
    if args.engine == "grpo":  # grpo's own GRPOConfig mapping and trainer class
        from grpo_cli.config import DataSettings, Settings, TrainSettings
        from grpo_cli.train import grpo_config, trainer_class

        train = TrainSettings(**same, extra={"save_strategy": "no"})
        settings = Settings(data=DataSettings(rewards=["answer_tag"]), train=train)
        vllm = llm is not None
        config, GRPOTrainer = grpo_config(settings, cpu=cpu, vllm=vllm), trainer_class(cpu)  # noqa: N806
    else:
        config = GRPOConfig(**same, save_strategy="no", disable_tqdm=True, use_cpu=cpu,
                            bf16=not cpu and torch.cuda.is_bf16_supported())  # fmt: skip
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[REWARDS["answer_tag"]], args=config,
                          train_dataset=Dataset.from_list(rows), callbacks=[Record()])  # fmt: skip
    logp_seconds = {True: [], False: []}  # forward passes for log-probs, with and without grad
    logps = trainer._get_per_token_logps_and_entropies

    def timed_logps(*a, **kw):
        start = time.perf_counter()
        out = logps(*a, **kw)
        logp_seconds[torch.is_grad_enabled()].append(time.perf_counter() - start)
        return out

    trainer._get_per_token_logps_and_entropies = timed_logps
    num_tokens = []
    trainer.add_callback(
        type(
            "T",
            (TrainerCallback,),
            {"on_log": lambda self, a, s, c, logs=None, **k: num_tokens.append(logs.get("num_tokens"))},
        )()
    )
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    counted = steps[1:]  # the first step warms up
    tokens = [b - a for a, b in zip(num_tokens, num_tokens[1:]) if a is not None and b is not None][: len(counted)]
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if not cpu
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "engine": args.engine, "note": note,
        "step_time": statistics.median(s["step_time"] for s in counted),
        "generation_tokens_per_s": sum(s["completion_tokens"] for s in counted) / sum(s["generation"] for s in counted),
        "training_tokens_per_s": sum(tokens) / sum(s["step_time"] - s["generation"] for s in counted),
        "peak_memory_gib": peak, "memory_kind": "GPU allocated" if not cpu else "peak RSS",
        "profile": {part: statistics.median(s[key] for s in counted) for part, key in
                    [("generation", "generation"), ("log-prob forward, no grad", "logp_nograd"),
                     ("log-prob forward for the loss", "logp_grad")]}
                   | {"backward, optimizer, rewards, rest": statistics.median(
                       s["step_time"] - s["generation"] - s["logp_grad"] - s["logp_nograd"] for s in counted)},
    }  # fmt: skip


def compare(args) -> None:
    results = {"grpo": [], "plain": []}
    for round_ in range(args.rounds):
        for engine in ("grpo", "plain"):
            cmd = [sys.executable, __file__, "--engine", engine] + sys.argv[1:]
            print(f"round {round_ + 1}/{args.rounds}: {engine} ...", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("{")), None)
            if done.returncode or line is None:
                sys.exit(f"{engine} run failed:\n{done.stderr[-3000:]}")
            results[engine].append(json.loads(line))
    keys = [("step_time", "median step time (s)"), ("generation_tokens_per_s", "generation tokens/s"),
            ("training_tokens_per_s", "training tokens/s"), ("peak_memory_gib", "peak memory (GiB)")]  # fmt: skip
    med = {e: {k: statistics.median(r[k] for r in rs) for k, _ in keys} for e, rs in results.items()}
    print(f"\nmodel {args.arch + ' (random weights)' if args.arch else args.model}, {args.prompts} prompt(s) x {args.generations} completions x {args.completion_length} tokens, "
          f"LoRA r{args.lora_rank}, {args.steps - 1} counted steps x {args.rounds} rounds")  # fmt: skip
    print(f"grpo: {results['grpo'][0]['note']}; plain: {results['plain'][0]['note']}")
    print(f"memory: {results['grpo'][0]['memory_kind']}")
    print(f"{'':28}{'grpo':>12}{'plain':>12}{'grpo/plain':>12}")
    for key, label in keys:
        g, p = med["grpo"][key], med["plain"][key]
        print(f"{label:28}{g:12.2f}{p:12.2f}{g / p:12.2f}")
    print("\nwhere a step's time goes (median seconds):")
    print(f"{'':36}{'grpo':>10}{'plain':>10}")
    for part in results["grpo"][0]["profile"]:
        g = statistics.median(r["profile"][part] for r in results["grpo"])
        p = statistics.median(r["profile"][part] for r in results["plain"])
        print(f"{part:36}{g:10.2f}{p:10.2f}")
    if med["grpo"]["step_time"]:
        print(
            f"speed-up (plain step time / grpo step time): {med['plain']['step_time'] / med['grpo']['step_time']:.2f}x"
        )


if __name__ == "__main__":
    args = arguments()
    if args.arch:
        args.model = build_arch(args.arch, args.layers)
    if args.engine:
        print(json.dumps(one_run(args)), flush=True)
    else:
        compare(args)
