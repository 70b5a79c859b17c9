"""What GRPO can sharpen on a code data set, before training: the base model's greedy pass@1, and its pass@k when
sampling k completions a task at the recipe's temperature, each scored by code_tests in the sandbox. RL on a small
model mostly turns pass@k into pass@1, so a set worth training on has a low pass@1 and a high pass@k.

    python bench/code_pass_at_k.py --dataset harder-functions --limit 40        # 40 held-out tasks, k=8, T=0.7
    python bench/code_pass_at_k.py --dataset functions --k 4 --show 3           # print 3 failing greedy answers
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_cli import sandbox  # noqa: E402
from grpo_cli.config import DataSettings  # noqa: E402
from grpo_cli.data import CODE_SYSTEM_PROMPT, load_examples  # noqa: E402
from grpo_cli.generate import Sampling, generate_hf  # noqa: E402
from grpo_cli.models import resolve_model  # noqa: E402
from rewards.code import code_tests_reward  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="harder-functions")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=40, help="the first N tasks")
    parser.add_argument("--k", type=int, default=8, help="samples a task")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--show", type=int, default=0, help="print this many failing greedy answers")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    box = sandbox.resolve()
    if box.problem:
        raise SystemExit(f"no sandbox here: {box.problem}")
    sandbox._current = box
    data = DataSettings(dataset=args.dataset, split=args.split, system_prompt=CODE_SYSTEM_PROMPT, limit=args.limit)
    tasks = load_examples(data)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.top_k = 0  # as TRL samples while training: temperature and top-p only
    texts = [tokenizer.apply_chat_template(t["prompt"], add_generation_prompt=True, tokenize=False) for t in tasks]

    started = time.perf_counter()
    greedy = generate_hf(model, tokenizer, texts, Sampling(max_tokens=args.max_tokens, greedy=True), batch_size=32)
    sampling = Sampling(temperature=args.temperature, top_p=1.0, max_tokens=args.max_tokens)
    sampled = generate_hf(model, tokenizer, [t for t in texts for _ in range(args.k)], sampling, batch_size=32)
    seconds = time.perf_counter() - started

    def columns(repeat: int) -> dict:
        return {key: [t[key] for t in tasks for _ in range(repeat)] for key in ("test", "entry_point")}

    first = code_tests_reward(None, greedy, **columns(1))
    scores = code_tests_reward(None, sampled, **columns(args.k))
    solved = [any(scores[i * args.k : (i + 1) * args.k]) for i in range(len(tasks))]
    n = len(tasks)
    print(
        f"{args.model} on {n} {args.dataset} ({args.split}) tasks, {args.max_tokens} tokens, {seconds:.0f} s: "
        f"greedy pass@1 {100 * sum(first) / n:.1f}%, sampled pass@1 {100 * sum(scores) / len(scores):.1f}% and "
        f"pass@{args.k} {100 * sum(solved) / n:.1f}% at temperature {args.temperature}"
    )
    failing = [(task, text) for task, text, score in zip(tasks, greedy, first) if not score]
    for task, text in failing[: args.show]:
        print(f"\n{task['prompt'][-1]['content']}\n{text}")


if __name__ == "__main__":
    main()
