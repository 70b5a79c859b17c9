"""Score the base model and the adapter on the same held-out prompts."""

import csv
import io
import re
import statistics
from pathlib import Path

from grpo_cli.adapter import occupied, publish, write_json
from grpo_cli.config import DataSettings, Settings
from grpo_cli.data import TASK_COLUMN, code_columns
from grpo_cli.errors import GrpoError
from rewards import resolve
from rewards.code import code_block, code_io_reward, code_tests_reward
from rewards.format import FINAL_ANSWER
from rewards.numeric import same_number
from rewards.reference import extract_xml_answer
from rewards.tasks import task_score_reward

TAGGED = re.compile(r"<answer>.*?</answer>\s*$", re.S)  # a task's answer may be any text

COLUMNS = ["accuracy", "format_rate", "mean_length"]
ROW_KEYS = {"question", "answer", "completion", "correct", "formatted", "length", "tool_calls", "tool_failures",
            "conversation"}  # fmt: skip


def score(completions: list, examples: list[dict], rewards: list[str], tokenizer=None) -> list[dict]:
    """Per prompt: correct (numeric equivalence; for code rows, every test passes: pass@1 with one greedy sample),
    formatted (ends with <answer>N</answer>; for code, holds a ```python block), each reward, length, and the tool
    calls made and failed. A completion is a Conversation (grpo_cli/generate.py) or its text; the rewards see the
    whole conversation, as TRL passes it, and the answer is read from its final assistant message.

    >>> example = {"prompt": [{"role": "user", "content": "2 + 3?"}], "answer": "5"}
    >>> rows = score(["<answer>5</answer>", "five"], [example] * 2, ["answer_tag"])
    >>> [(r["correct"], r["formatted"], r["answer_tag"]) for r in rows]
    [(True, True, 1.0), (False, False, 0.0)]
    """
    from grpo_cli.generate import Conversation

    conversations = [c if isinstance(c, Conversation) else Conversation([{"role": "assistant", "content": c}])
                     for c in completions]  # fmt: skip
    texts = [c.text for c in conversations]
    messages = [c.messages for c in conversations]
    prompts = [e["prompt"] for e in examples]
    answers = [e["answer"] for e in examples]
    code = code_columns(examples[0])  # the rows' tests, for the code rewards
    columns = {k: [e.get(k) for e in examples] for k in code + [c for c in (TASK_COLUMN,) if c in examples[0]]}
    environments = [c.environment for c in conversations]
    if any(e is not None for e in environments):
        columns["environments"] = environments
    per_reward = {}
    for spec in rewards:
        func, _ = resolve(spec)
        per_reward[spec.split(":")[0]] = func(prompts=prompts, completions=messages, answer=answers, **columns)
    for kind in {type(e) for e in environments if callable(getattr(e, "get_reward", None))}:
        per_reward[kind.__name__] = [e.get_reward() if type(e) is kind else None for e in environments]
    task = TASK_COLUMN in examples[0]
    if task:  # the task's own verifier: full credit
        keys = [e[TASK_COLUMN] for e in examples]
        correct = [value == 1.0 for value in task_score_reward(messages, keys)]
    elif code:
        tests = code_tests_reward if {"test", "test_list"} & set(code) else code_io_reward
        correct = [value == 1.0 for value in tests(prompts, messages, **columns)]
    else:
        correct = ["<answer>" in t and same_number(extract_xml_answer(t), a) for t, a in zip(texts, answers)]
    rows = []
    for i, (text, answer) in enumerate(zip(texts, answers)):
        words = " ".join(str(m.get("content") or "") for m in messages[i] if m["role"] == "assistant")
        rows.append(
            {
                "question": prompts[i][-1]["content"],
                "answer": answer,
                "completion": text,
                "correct": correct[i],
                "formatted": code_block(text) is not None
                if code
                else bool(TAGGED.search(text))
                if task
                else bool(FINAL_ANSWER.search(text)),
                "length": len(tokenizer(words, add_special_tokens=False)["input_ids"])
                if tokenizer
                else len(words.split()),
                "tool_calls": conversations[i].calls,
                "tool_failures": conversations[i].failures,
                **({"conversation": messages[i]} if len(messages[i]) > 1 else {}),
                **{name: values[i] for name, values in per_reward.items()},
            }
        )
    return rows


def summarize(rows: list[dict], tools: bool = False) -> dict:
    """Accuracy, format rate, mean length and the mean of each reward; with tools, the calls per completion, the
    share of completions that called one, and the share of calls that failed.

    >>> summarize([{"correct": True, "formatted": True, "length": 4, "r": 1.0},
    ...            {"correct": False, "formatted": True, "length": 6, "r": 0.0}])
    {'accuracy': 0.5, 'format_rate': 1.0, 'mean_length': 5.0, 'r': 0.5}
    """
    summary = {
        "accuracy": float(statistics.mean(r["correct"] for r in rows)),
        "format_rate": float(statistics.mean(r["formatted"] for r in rows)),
        "mean_length": float(statistics.mean(r["length"] for r in rows)),
    }
    if tools:
        summary |= tool_figures(rows)
    names = [k for k in rows[0] if k not in ROW_KEYS]  # the rewards, and environments' own
    return summary | {
        name: statistics.mean(r[name] for r in rows if r[name] is not None) if any(r[name] is not None for r in rows)
        else 0.0 for name in names
    }  # fmt: skip


def tool_figures(rows: list[dict]) -> dict:
    """Tool calls per completion, the share of completions that called a tool, and the share of calls that failed.

    >>> tool_figures([{"tool_calls": 2, "tool_failures": 1}, {"tool_calls": 0, "tool_failures": 0}])
    {'tool_calls_per_completion': 1.0, 'tool_use_rate': 0.5, 'tool_failure_rate': 0.5}
    """
    calls = sum(r["tool_calls"] for r in rows)
    return {
        "tool_calls_per_completion": calls / len(rows),
        "tool_use_rate": sum(r["tool_calls"] > 0 for r in rows) / len(rows),
        "tool_failure_rate": sum(r["tool_failures"] for r in rows) / calls if calls else 0.0,
    }


def flipped(base: list[dict], tuned: list[dict], key: str, n: int = 3) -> list[tuple[str, dict, dict]]:
    """Prompts whose outcome on ``key`` differs between base and adapter, gains first."""
    gains = [("gained", b, t) for b, t in zip(base, tuned) if t[key] and not b[key]]
    losses = [("lost", b, t) for b, t in zip(base, tuned) if b[key] and not t[key]]
    return gains[:n] + losses[:n]


def csv_text(base: list[dict], tuned: list[dict]) -> str:
    out = io.StringIO()
    fields = ["model", "index", *(k for k in base[0] if k != "conversation")]  # conversations: in eval.json
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
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
    prompts = pair.messages([e["prompt"][-1]["content"] for e in examples], data.system_prompt)
    base = score(pair.answer(prompts, sampling, False, examples), examples, rewards, pair.tokenizer)
    tuned = None
    if pair.lora_dir:
        tuned = score(pair.answer(prompts, sampling, True, examples), examples, rewards, pair.tokenizer)
    tools = pair.toolset is not None
    summaries = {"base": summarize(base, tools)}
    if tuned:
        summaries["adapter"] = summarize(tuned, tools)
    result = {"prompts": len(examples), "dataset": data.dataset, "split": data.split, "summary": summaries,
              "base": base, "adapter": tuned}  # fmt: skip

    def write(tmp: Path) -> None:
        write_json(tmp / "eval.json", result)
        (tmp / "eval.csv").write_text(csv_text(base, tuned or []))

    publish(output_dir, write, force=True)
    return summaries, base, tuned


def reward_check(settings: Settings, prompts: int = 8) -> tuple[list[dict], float, int, int, dict, dict]:
    """Sample the base model as training would (with its tools, in the same loop); per reward: mean, std, share of
    groups with no spread. Also returns the share of completions without an <answer> tag, the prompt count, the
    group size, for code data how many completions had no ```python block and how many programs ran past the time
    limit, and with tools the calls per completion, the share that called one and the share of calls that failed."""
    import statistics

    from grpo_cli import models, plan, tools
    from grpo_cli.data import fit_prompt_length, load_examples
    from grpo_cli.generate import Pair, Sampling
    from rewards import checked

    d = settings.data
    funcs = {spec: checked(resolve(spec)[0], d.reward_timeout, d.reward_nan) for spec in d.rewards}
    if d.tools or d.environment:
        models.unsloth_first()
    toolset = tools.resolve(d)
    if toolset:  # the prompts carry the tools' schemas: the lengths fit them as the run's would
        fit_prompt_length(
            settings, tools.check_template(settings.model.model, plan.resolve(settings)), toolset.schemas()
        )
    examples = load_examples(settings.data)[:prompts]
    trained = plan.resolve(settings).to_dict()  # the weights as training loads them (16-bit for a server, FSDP2)
    pair = Pair(settings.model.model, None, settings=settings.model, toolset=toolset, trained=trained)
    g = settings.train.num_generations
    sampling = Sampling(
        temperature=settings.train.temperature,
        top_p=1.0,
        max_tokens=settings.train.max_completion_length,
        seed=settings.train.seed,
    )
    repeated = [e for e in examples for _ in range(g)]
    conversations = pair.answer([e["prompt"] for e in repeated], sampling, False, repeated)
    completions = [c.messages for c in conversations]
    kept = code_columns(examples[0]) + [c for c in (TASK_COLUMN,) if c in examples[0]]
    columns = {k: [e.get(k) for e in repeated] for k in kept}
    if toolset and toolset.environments:
        columns["environments"] = [c.environment for c in conversations]
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
    unparsed = sum("<answer>" not in c.text for c in conversations) / len(conversations)
    code = {}
    if code_columns(examples[0]):
        code = {
            "no_code_block": sum(code_block(c.text) is None for c in conversations),
            "timed_out": sum(f.counts["timed_out"] for f in (code_tests_reward, code_io_reward)) - timed_out,
            "completions": len(completions),
        }
    used = {}
    if toolset:
        used = tool_figures([{"tool_calls": c.calls, "tool_failures": c.failures} for c in conversations])
    return rows, unparsed, len(examples), g, code, used
