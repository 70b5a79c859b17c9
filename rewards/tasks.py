"""A reasoning-gym task's own verifier as the reward: the completion's <answer> scored by the task's
``score_answer`` against the entry the row's ``task`` key regenerates.

Several verifiers parse the answer with ``eval`` or sympy (countdown, puzzle24, the integration tasks, ...), so the
scoring never runs in the trainer's process: a child process of its own, with an empty environment and resource
limits, gets plain JSON (the keys and the answers) on stdin and gives one number per answer on stdout, parsed
strictly. It is not the bubblewrap sandbox of the code rewards: it sees the file system as the trainer's user."""

import inspect
import json
import math
import os
import resource
import subprocess
import sys

from grpo_cli.data.tasks import _revive
from grpo_cli.errors import GrpoError
from rewards.reference import completion_text, extract_xml_answer

SCORER = r"""
import dataclasses, datetime, enum, json, sys, types, typing
from functools import lru_cache
import reasoning_gym

@lru_cache(maxsize=None)
def dataset(name, config):
    hints = typing.get_type_hints(reasoning_gym.factory.DATASETS[name][1])
    return reasoning_gym.create_dataset(name, **{k: _revive(hints.get(k), v) for k, v in json.loads(config).items()})

job = json.loads(sys.stdin.read())
scores = []
for key, answer in zip(job["keys"], job["answers"]):
    task = json.loads(key)
    data = dataset(task["name"], json.dumps(task["config"], sort_keys=True))
    try:
        score = float(data.score_answer(answer, data[task["index"]])) if answer is not None else 0.0
    except Exception:  # a verifier that fails on the answer it was given: no credit
        score = 0.0
    scores.append(score if 0.0 <= score <= 1.0 else 0.0)
sys.stdout.write(json.dumps(scores))
"""
SCORER = inspect.getsource(_revive) + SCORER  # a key's JSON config read back as the task's config types have it
SECONDS = 120
MEMORY = 8 << 30  # address space: numpy's and sympy's imports map much more than they use


def _limits():
    resource.setrlimit(resource.RLIMIT_CPU, (SECONDS, SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def score_answers(keys: list[str], answers: list[str | None]) -> list[float]:
    """The task's score (0..1) of each answer for the entry its key names, computed in a child process."""
    job = json.dumps({"keys": keys, "answers": answers})
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", SCORER], input=job, capture_output=True, text=True, env=env,
            timeout=SECONDS, preexec_fn=_limits, cwd="/",
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise GrpoError(f"the task's verifier took longer than {SECONDS}s on {len(keys)} answers") from exc
    try:
        scores = json.loads(done.stdout) if done.returncode == 0 else None
    except json.JSONDecodeError:
        scores = None
    if not (isinstance(scores, list) and len(scores) == len(keys) and all(isinstance(s, float) for s in scores)):
        said = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise GrpoError(f"the task's verifier failed ({said}): check that reasoning-gym 0.1.25 is installed")
    return [s if math.isfinite(s) else 0.0 for s in scores]


def task_score_reward(completions, task, **kwargs) -> list[float]:
    """The reasoning-gym task's own score (0..1) of the text inside the completion's <answer> tags; 0 without them.

    >>> key = '{"config": {"max_digits": 1, "max_terms": 2, "min_digits": 1, "min_terms": 2, "allow_negation": false,'
    >>> key += ' "seed": 5, "size": 10}, "index": 0, "name": "chain_sum"}'
    >>> task_score_reward(["<answer>8</answer>", "<answer>9</answer>", "8"], [key] * 3)
    [1.0, 0.0, 0.0]
    """
    texts = [completion_text(c) for c in completions]
    answers = [extract_xml_answer(t) if "<answer>" in t else None for t in texts]
    return score_answers(list(task), answers)
