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
    p.add_argument("--steps", type=int, default=5, help="steps per run; the first is warm-up and not counted")
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
    p.add_argument(
        "--busy", type=int, default=0, help="also measure each round beside this many busy processes (a busy machine)"
    )
    p.add_argument("--budget", type=float, default=540, help="seconds; no round starts that would end past it")
    p.add_argument(
        "--results", default="auto", help="markdown file for the figures (auto: bench/results/<machine kind>.md; none)"
    )
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

    from grpo_cli.config import cache_dir
    from grpo_cli.models import resolve_model

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
    from grpo_cli.config import ModelSettings, Settings
    from grpo_cli.plan import resolve

    settings = ModelSettings(model=args.model, lora_rank=args.lora_rank, load_in_4bit=args.four_bit, max_seq_length=512)
    plan = resolve(Settings(model=settings))
    if engine == "grpo":
        from grpo_cli import models

        models.patch_fast_rl(plan)
        model, tokenizer = models.load_model(settings, plan)
        precision = "4-bit" if plan.load_in_4bit else plan.compute
        engine = ", vLLM generation" if plan.generator == "vllm" else ""
        return models.add_lora(model, settings, plan), tokenizer, f"Unsloth, {precision}{engine}", plan
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
    return get_peft_model(model, lora), tokenizer, note, None


def one_run(args) -> dict:
    if args.engine == "grpo":
        import unsloth  # noqa: F401  (first, as in grpo)
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_cli.data import arithmetic_problems
    from rewards import REWARDS

    model, tokenizer, note, plan = load(args.engine, args)
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
                              "completion_tokens": logs["completions/mean_length"] * completions,
                              "completion_max": logs["completions/max_length"]})  # fmt: skip
                generation_seconds.clear()
                logp_seconds[True].clear()
                logp_seconds[False].clear()

    cpu = not torch.cuda.is_available()
    same = dict(output_dir="/tmp/grpo-bench", max_steps=args.steps, per_device_train_batch_size=args.generations * args.prompts,
                num_generations=args.generations, max_completion_length=args.completion_length, learning_rate=1e-5,
                beta=0.0, logging_steps=1, report_to="none", seed=args.seed, temperature=1.0)  # fmt: skip
    if args.engine == "grpo":  # grpo's own GRPOConfig mapping and trainer class
        from grpo_cli.config import DataSettings, Settings, TrainSettings
        from grpo_cli.trainer import grpo_config, trainer_class

        train = TrainSettings(**same, extra={"save_strategy": "no"})
        settings = Settings(data=DataSettings(rewards=["answer_tag"]), train=train)
        config, GRPOTrainer = grpo_config(settings, plan), trainer_class(plan)  # noqa: N806
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
    from grpo_cli import threads

    return {
        "engine": args.engine, "note": note, "threads": threads.describe(),
        "step_time": statistics.median(s["step_time"] for s in counted),
        "generation_tokens_per_s": sum(s["completion_tokens"] for s in counted) / sum(s["generation"] for s in counted),
        "training_tokens_per_s": sum(tokens) / sum(s["step_time"] - s["generation"] for s in counted),
        "peak_memory_gib": peak, "memory_kind": "GPU allocated" if not cpu else "peak RSS",
        "tokens": {"completion": statistics.median(s["completion_tokens"] for s in counted),
                   "completion_max": statistics.median(s["completion_max"] for s in counted),
                   "prompt": statistics.median(tokens) / (args.generations * args.prompts)
                   - statistics.median(s["completion_tokens"] for s in counted) / (args.generations * args.prompts)},
        "profile": {part: statistics.median(s[key] for s in counted) for part, key in
                    [("generation", "generation"), ("log-prob forward, no grad", "logp_nograd"),
                     ("log-prob forward for the loss", "logp_grad")]}
                   | {"backward, optimizer, rewards, rest": statistics.median(
                       s["step_time"] - s["generation"] - s["logp_grad"] - s["logp_nograd"] for s in counted)},
    }  # fmt: skip


def linear_shapes(model: str) -> list[tuple[int, int, int]]:
    """(out, in, count) of every linear weight in the model's forward, LM head included, from its config."""
    from transformers import AutoConfig

    from grpo_cli.models import resolve_model

    c = AutoConfig.from_pretrained(resolve_model(model))
    h, i, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    head = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * head, c.num_key_value_heads * head
    return [(q, h, n), (h, q, n), (kv, h, 2 * n), (i, h, 2 * n), (h, i, n), (c.vocab_size, h, 1)]


def measure_machine(model: str, rows: int) -> dict:
    """The machine's own figures in the dtype grpo computes in: memory read bandwidth (the best of summing 1 GiB)
    and matmul throughput at the model's shapes with ``rows`` rows (the best of torch's linear and oneDNN's packed
    linear, each shape timed once and counted as often as the model has it)."""
    import torch

    from grpo_cli import cpu

    dtype = torch.bfloat16 if torch.cuda.is_available() or cpu.kind() in ("amx", "avx512_bf16") else torch.float32
    gib = torch.ones(2**28, dtype=torch.float32)
    bandwidth = gib.numel() * 4 / cpu.best_time(gib.sum, 3)
    del gib
    shapes, seconds, flops = linear_shapes(model), 0.0, 0.0
    for out, inp, count in shapes:
        seconds += count * min(cpu.linear_seconds(torch.randn(out, inp, dtype=dtype), rows, repeats=3))
        flops += count * 2 * rows * out * inp
    params = sum(out * inp * count for out, inp, count in shapes)
    return {"dtype": str(dtype).replace("torch.", ""), "bandwidth": bandwidth, "flops": flops / seconds,
            "params": params, "bytes": params * dtype.itemsize, "rows": rows}  # fmt: skip


def step_bound(machine: dict, tokens: dict, completions: int, generations: int) -> dict:
    """A GRPO step's lower bound on this machine (seconds): generation reads every weight once a decoded token for
    the whole batch, or computes its FLOPs, whichever is slower, plus each prompt's prefill once; the loss forward and
    backward (input gradients through the frozen base; LoRA's own are small) cost 4 FLOPs a weight a token, the
    prompt counted once a group. Attention and the optimizer are left out: small at these lengths."""
    p, f = machine["params"], machine["flops"]
    decode = tokens["completion_max"] * max(machine["bytes"] / machine["bandwidth"], 2 * p * completions / f)
    prefill = 2 * p * tokens["prompt"] * completions / generations / f  # each prompt once
    loss = 4 * p * (tokens["prompt"] * completions / generations + tokens["completion"]) / f
    return {"generation": decode + prefill, "loss forward + backward": loss, "step": decode + prefill + loss}


def compare(args) -> None:
    import platform

    from grpo_cli import cpu

    began = time.time()
    machine = None  # the bound is a CPU figure: on a GPU only the comparison
    if not torch_cuda():
        machine = measure_machine(args.model, rows=args.generations * args.prompts * args.completion_length)
        print(f"machine: {cpu.describe()}; {machine['dtype']}: memory read {machine['bandwidth'] / 1e9:.1f} GB/s, "
              f"matmul {machine['flops'] / 1e9:.1f} GFLOP/s at the model's shapes x {machine['rows']} rows", flush=True)  # fmt: skip
    results = {"grpo": [], "plain": []}
    beside_busy = {"grpo": [], "plain": []}  # with --busy: each round again beside that many busy processes
    rounds = 0
    for round_ in range(args.rounds):
        took = (time.time() - began) / max(rounds, 1)
        if rounds and time.time() - began + took > args.budget:
            print(f"stopping after {rounds} of {args.rounds} rounds: another would pass the {args.budget:.0f} s budget")
            break
        rounds += 1
        for neighbours, into in [(0, results)] + ([(args.busy, beside_busy)] if args.busy else []):
            others = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(neighbours)]
            try:
                for engine in ("grpo", "plain"):
                    cmd = [sys.executable, __file__, "--engine", engine] + sys.argv[1:]
                    print(f"round {round_ + 1}/{args.rounds}: {engine}, {neighbours} busy ...", flush=True)
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("{")), None)
                    if done.returncode or line is None:
                        sys.exit(f"{engine} run failed:\n{done.stderr[-3000:]}")
                    into[engine].append(json.loads(line))
            finally:
                for other in others:
                    other.kill()
    keys = [("step_time", "median step time (s)"), ("generation_tokens_per_s", "generation tokens/s"),
            ("training_tokens_per_s", "training tokens/s"), ("peak_memory_gib", "peak memory (GiB)")]  # fmt: skip
    med = {e: {k: statistics.median(r[k] for r in rs) for k, _ in keys} for e, rs in results.items()}
    completions = args.generations * args.prompts
    lines = [f"model {args.arch + ' (random weights)' if args.arch else args.model}, {args.prompts} prompt(s) x {args.generations} completions x {args.completion_length} tokens, "
             f"LoRA r{args.lora_rank}, {args.steps - 1} counted steps x {rounds} rounds",
             f"grpo: {results['grpo'][0]['note']}; plain: {results['plain'][0]['note']}",
             f"memory: {results['grpo'][0]['memory_kind']}", "",
             "| | grpo | plain | grpo/plain |", "| --- | --- | --- | --- |"]  # fmt: skip
    for key, label in keys:
        g, p = med["grpo"][key], med["plain"][key]
        lines.append(f"| {label} | {g:.2f} | {p:.2f} | {g / p:.2f} |")
    lines += ["", "| where a step's time goes (median s) | grpo | plain |", "| --- | --- | --- |"]
    for part in results["grpo"][0]["profile"]:
        g = statistics.median(r["profile"][part] for r in results["grpo"])
        p = statistics.median(r["profile"][part] for r in results["plain"])
        lines.append(f"| {part} | {g:.2f} | {p:.2f} |")
    lines += [
        "",
        f"speed-up (plain step time / grpo step time): {med['plain']['step_time'] / med['grpo']['step_time']:.2f}x",
    ]
    if args.busy:
        lines += [
            "",
            f"| median step time (s) | idle | beside {args.busy} busy | busy / idle |",
            "| --- | --- | --- | --- |",
        ]
        for engine in ("grpo", "plain"):
            idle = med[engine]["step_time"]
            busy = statistics.median(r["step_time"] for r in beside_busy[engine])
            lines.append(f"| {engine} | {idle:.2f} | {busy:.2f} | {busy / idle:.2f} |")
        lines.append(f"grpo's threads: {results['grpo'][0].get('threads', 'as torch chose')}")
    if machine:
        tokens = {k: statistics.median(r["tokens"][k] for r in results["grpo"]) for k in results["grpo"][0]["tokens"]}
        bound = step_bound(machine, tokens, completions, args.generations)
        flags = " ".join(sorted(f for f in cpu.flags() if f.startswith(("avx", "amx", "fma", "f16c"))))
        lines += [
            f"bound a step: {bound['step']:.2f} s = generation {bound['generation']:.2f} (decoding "
            f"{tokens['completion_max']:.0f} tokens x {completions} at the memory or FLOP limit, and the "
            f"{tokens['prompt']:.0f}-token prompts) + loss forward and backward {bound['loss forward + backward']:.2f}",
            f"step time / bound: grpo {med['grpo']['step_time'] / bound['step']:.2f}, "
            f"plain {med['plain']['step_time'] / bound['step']:.2f}",
            f"machine: {cpu.describe()}; flags: {flags}",
            f"measured: memory read {machine['bandwidth'] / 1e9:.1f} GB/s; {machine['dtype']} matmul "
            f"{machine['flops'] / 1e9:.1f} GFLOP/s at the model's shapes x {machine['rows']} rows (the best of torch "
            f"and oneDNN); {machine['params'] / 1e6:.0f}M weights in the linear layers",
        ]
    print("\n" + "\n".join(lines))
    if args.results != "none" and not (args.results == "auto" and args.layers):  # a shrunk model: no results
        import datetime
        from importlib.metadata import version

        path = Path(
            args.results if args.results != "auto" else Path(__file__).parent / "results" / f"{machine_kind()}.md"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "trl", "peft", "unsloth"))
        path.write_text(
            f"# {machine_kind()}\n\n`{' '.join(['python bench/grpo_bench.py', *sys.argv[1:]])}`"
            f" on {datetime.date.today()}, {time.time() - began:.0f} s in all; {versions}; Python "
            f"{platform.python_version()}\n\n" + "\n".join(lines) + "\n"
        )
        print(f"written to {path}")


def torch_cuda() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else ""


def machine_kind() -> str:
    """The results file's name: the GPU's name, or cpu-<kind> (avx2, avx512, avx512_bf16, amx, arm)."""
    from grpo_cli import cpu

    name = torch_cuda() or f"cpu-{cpu.kind()}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower())


if __name__ == "__main__":
    args = arguments()
    if args.engine == "grpo":  # grpo's threads and waiting, set before torch loads, as `grpo` sets them
        from grpo_cli import threads

        threads.prepare()
    if args.arch:
        args.model = build_arch(args.arch, args.layers)
    if args.engine:
        print(json.dumps(one_run(args)), flush=True)
    else:
        compare(args)
