"""Score the base model and the adapter on the same held-out prompts."""

import csv
import io
import statistics
from pathlib import Path

from grpo_cli.adapter import occupied, publish, write_json
from grpo_cli.config import DataSettings, Settings
from grpo_cli.data import code_columns
from grpo_cli.errors import GrpoError
from rewards import resolve
from rewards.code import code_block, code_io_reward, code_tests_reward
from rewards.format import FINAL_ANSWER
from rewards.numeric import same_number
from rewards.reference import extract_xml_answer

COLUMNS = ["accuracy", "format_rate", "mean_length"]


def score(completions: list[str], examples: list[dict], rewards: list[str], tokenizer=None) -> list[dict]:
    """Per prompt: correct (numeric equivalence; for code rows, every test passes: pass@1 with one greedy sample),
    formatted (ends with <answer>N</answer>; for code, holds a ```python block), each reward, length.

    >>> example = {"prompt": [{"role": "user", "content": "2 + 3?"}], "answer": "5"}
    >>> rows = score(["<answer>5</answer>", "five"], [example] * 2, ["answer_tag"])
    >>> [(r["correct"], r["formatted"], r["answer_tag"]) for r in rows]
    [(True, True, 1.0), (False, False, 0.0)]
    """
    messages = [[{"role": "assistant", "content": c}] for c in completions]
    prompts = [e["prompt"] for e in examples]
    answers = [e["answer"] for e in examples]
    code = code_columns(examples[0])  # the rows' tests, for the code rewards
    columns = {k: [e.get(k) for e in examples] for k in code}
    per_reward = {}
    for spec in rewards:
        func, _ = resolve(spec)
        per_reward[spec.split(":")[0]] = func(prompts=prompts, completions=messages, answer=answers, **columns)
    if code:
        tests = code_tests_reward if {"test", "test_list"} & set(code) else code_io_reward
        correct = [value == 1.0 for value in tests(prompts, messages, **columns)]
    else:
        correct = ["<answer>" in t and same_number(extract_xml_answer(t), a) for t, a in zip(completions, answers)]
    rows = []
    for i, (text, answer) in enumerate(zip(completions, answers)):
        rows.append(
            {
                "question": prompts[i][-1]["content"],
                "answer": answer,
                "completion": text,
                "correct": correct[i],
                "formatted": code_block(text) is not None if code else bool(FINAL_ANSWER.search(text)),
                "length": len(tokenizer(text, add_special_tokens=False)["input_ids"])
                if tokenizer
                else len(text.split()),
                **{name: values[i] for name, values in per_reward.items()},
            }
        )
    return rows


def summarize(rows: list[dict], rewards: list[str]) -> dict:
    """Accuracy, format rate, mean length and the mean of each reward.

    >>> summarize([{"correct": True, "formatted": True, "length": 4, "r": 1.0},
    ...            {"correct": False, "formatted": True, "length": 6, "r": 0.0}], ["r"])
    {'accuracy': 0.5, 'format_rate': 1.0, 'mean_length': 5.0, 'r': 0.5}
    """
    summary = {
        "accuracy": float(statistics.mean(r["correct"] for r in rows)),
        "format_rate": float(statistics.mean(r["formatted"] for r in rows)),
        "mean_length": float(statistics.mean(r["length"] for r in rows)),
    }
    return summary | {name: statistics.mean(r[name] for r in rows) for name in (s.split(":")[0] for s in rewards)}


def flipped(base: list[dict], tuned: list[dict], key: str, n: int = 3) -> list[tuple[str, dict, dict]]:
    """Prompts whose outcome on ``key`` differs between base and adapter, gains first."""
    gains = [("gained", b, t) for b, t in zip(base, tuned) if t[key] and not b[key]]
    losses = [("lost", b, t) for b, t in zip(base, tuned) if b[key] and not t[key]]
    return gains[:n] + losses[:n]


def csv_text(base: list[dict], tuned: list[dict]) -> str:
    out = io.StringIO()
    fields = ["model", "index", *base[0].keys()]
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for name, rows in (("base", base), ("adapter", tuned)):
        for i, row in enumerate(rows):
            writer.writerow({"model": name, "index": i, **row})
    return out.getvalue()


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Before any model loads: never over a folder with something in it, unless asked."""
    if occupied(output_dir) and not overwrite:
        raise GrpoError(f"eval output {output_dir} is not empty: pass --overwrite or another --output-dir")


def evaluate(pair, data: DataSettings, sampling, rewards: list[str], output_dir: Path, overwrite: bool = False):
    """Generate with both, score, write eval.json and eval.csv. Returns (summaries, base rows, adapter rows)."""
    from grpo_cli.data import load_examples

    check_output_dir(output_dir, overwrite)
    examples = load_examples(data)
    texts = pair.texts([e["prompt"][-1]["content"] for e in examples], data.system_prompt)
    base = score(pair.base(texts, sampling), examples, rewards, pair.tokenizer)
    tuned = score(pair.tuned(texts, sampling), examples, rewards, pair.tokenizer) if pair.lora_dir else None
    summaries = {"base": summarize(base, rewards)}
    if tuned:
        summaries["adapter"] = summarize(tuned, rewards)
    result = {"prompts": len(examples), "dataset": data.dataset, "split": data.split, "summary": summaries,
              "base": base, "adapter": tuned}  # fmt: skip

    def write(tmp: Path) -> None:
        write_json(tmp / "eval.json", result)
        (tmp / "eval.csv").write_text(csv_text(base, tuned or []))

    publish(output_dir, write, force=True)
    return summaries, base, tuned


def reward_check(settings: Settings, prompts: int = 8) -> tuple[list[dict], float, int, int, dict]:
    """Sample the base model as training would; per reward: mean, std, share of groups with no spread.
    Also returns the share of completions without an <answer> tag, the prompt count, the group size and, for code
    data, how many completions had no ```python block and how many programs ran past the time limit."""
    import statistics

    from grpo_cli.data import load_examples
    from grpo_cli.generate import Pair, Sampling
    from rewards import checked

    d = settings.data
    funcs = {spec: checked(resolve(spec)[0], d.reward_timeout, d.reward_nan) for spec in d.rewards}
    examples = load_examples(settings.data)[:prompts]
    pair = Pair(settings.model.model, None, settings=settings.model)
    g = settings.train.num_generations
    texts = pair.texts([e["prompt"][-1]["content"] for e in examples for _ in range(g)], settings.data.system_prompt)
    sampling = Sampling(
        temperature=settings.train.temperature,
        top_p=1.0,
        max_tokens=settings.train.max_completion_length,
        seed=settings.train.seed,
    )
    completions = [[{"role": "assistant", "content": c}] for c in pair.base(texts, sampling)]
    repeated = [e for e in examples for _ in range(g)]
    columns = {k: [e.get(k) for e in repeated] for k in code_columns(examples[0])}
    timed_out = sum(f.counts["timed_out"] for f in (code_tests_reward, code_io_reward))
    rows = []
    for spec, func in funcs.items():
        values = func(
            prompts=[e["prompt"] for e in repeated],
            completions=completions,
            answer=[e["answer"] for e in repeated],
            **columns,
        )
        groups = [values[i : i + g] for i in range(0, len(values), g)]
        rows.append({
            "reward": spec,
            "mean": statistics.mean(values),
            "std": statistics.pstdev(values),
            "zero_spread_groups": sum(len(set(group)) == 1 for group in groups) / len(groups),
        })  # fmt: skip
    unparsed = sum("<answer>" not in c[0]["content"] for c in completions) / len(completions)
    code = {}
    if columns:
        code = {
            "no_code_block": sum(code_block(c[0]["content"]) is None for c in completions),
            "timed_out": sum(f.counts["timed_out"] for f in (code_tests_reward, code_io_reward)) - timed_out,
            "completions": len(completions),
        }
    return rows, unparsed, len(examples), g, code
