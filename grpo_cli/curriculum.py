"""Difficulty that follows the model: a reasoning-gym task's level, moved by how the model does at it. The levels
are reasoning-gym's own curriculum for the task (its attributes, e.g. chain_sum's number of terms and digits). The
level goes up when what the curriculum follows reaches ``raise_at``: the task's mean score over the last ``window``
batches, or (``follow: held_out``) the accuracy of the latest held-out evaluation on the held-out items generated
again at the current level, so that a reading means the same at every level. It goes down when the share of groups
in which every completion failed over the last ``window`` batches reaches ``lower_at`` (zero spread because the task
is too hard). After a move the window starts again. Each batch's prompts are the rows the sampler picked, generated
again at the current level (the same item index, the same seed): the order of prompts never depends on the level."""

import collections
import dataclasses
import json

from grpo_cli.config import DataSettings, TrainSettings
from grpo_cli.errors import GrpoError

CURRICULUM = {"raise_at": 0.8, "lower_at": 0.75, "window": 2, "follow": "batch"}  # the recipe's keys, their defaults
FOLLOW = {
    "batch": "the mean task score of the last `window` training batches",
    "held_out": "the accuracy of the latest held-out evaluation, on its items generated at the current level",
}  # what raises the level
REWARD = "task_score"  # the task's own score, which the curriculum reads
LOOKAHEAD = 1000  # items a training row looks on for one that no held-out item asks
STATE = "curriculum.json"  # in each checkpoint: the level and the window, for resume


def check_curriculum(data: DataSettings, rewards: list[str] | None = None, train: TrainSettings | None = None) -> dict:
    """The recipe's curriculum with its defaults, checked before any model loads (with ``train``: that the held-out
    evaluation it may follow runs)."""
    from grpo_cli.data.tasks import PREFIX, curriculum_fields, levels, task_config, task_name

    given = data.curriculum if isinstance(data.curriculum, dict) else {}
    if data.curriculum is not True and not isinstance(data.curriculum, dict):
        raise GrpoError(f"curriculum: give true or a mapping of {', '.join(CURRICULUM)}, got {data.curriculum!r}")
    unknown = sorted(set(given) - set(CURRICULUM))
    if unknown:
        raise GrpoError(f"curriculum: {unknown[0]!r} is not a curriculum setting: use {', '.join(CURRICULUM)}")
    settings = {**CURRICULUM, **given}
    for key in ("raise_at", "lower_at"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise GrpoError(f"curriculum: {key} must be a share in (0, 1], got {value!r}")
    if isinstance(settings["window"], bool) or not isinstance(settings["window"], int) or settings["window"] < 1:
        raise GrpoError(f"curriculum: window must be a positive number of batches, got {settings['window']!r}")
    if not isinstance(settings["follow"], str) or settings["follow"] not in FOLLOW:  # a list or mapping: unhashable
        raise GrpoError(f"curriculum: follow must be {' or '.join(FOLLOW)}, got {settings['follow']!r}")
    if not data.dataset.startswith(PREFIX + ":"):
        raise GrpoError(f"curriculum: it moves a reasoning-gym task's level; {data.dataset} is no reasoning-gym:TASK")
    name = task_name(data.dataset)
    if not levels(name):
        raise GrpoError(f"curriculum: reasoning-gym has no curriculum for {name}: drop curriculum")
    own = {k: v for k, v in (data.task_settings or {}).items() if k not in ("seed", "size")}
    clash = sorted(set(own) & curriculum_fields(name))
    if clash:
        raise GrpoError(f"curriculum: drop {clash[0]} from task_settings: the curriculum's levels set it")
    for level in range(levels(name)):  # every level the curriculum may reach holds with the recipe's settings
        task_config(name, own, level)
    if rewards is not None and REWARD not in {r.split(":")[0] for r in rewards}:
        raise GrpoError(f"curriculum: it follows the task's own score: add the {REWARD} reward")
    if train is not None and settings["follow"] == "held_out":
        if not train.eval_steps:
            raise GrpoError(
                "curriculum: follow held_out reads the held-out evaluation, which is off: set eval_steps (e.g. "
                "eval_steps: 10), or follow batch"
            )
        if data.eval_dataset not in (None, data.dataset):
            raise GrpoError(
                f"curriculum: follow held_out reads {data.dataset}'s own held-out items at each level, not "
                f"{data.eval_dataset}: drop eval_dataset, or follow batch"
            )
    return settings


class Curriculum:
    """The level of one reasoning-gym task during training, and the rows at that level."""

    def __init__(self, data: DataSettings):
        from grpo_cli.data.tasks import levels, start_level, task_name

        self.data = data
        self.settings = check_curriculum(data)
        self.name = task_name(data.dataset)
        self.top = levels(self.name) - 1
        self.level = self.start = start_level(data)
        self.follows = self.settings["follow"]
        self.scores: collections.deque = collections.deque(maxlen=self.settings["window"])
        self.failed: collections.deque = collections.deque(maxlen=self.settings["window"])
        self._configs: dict[int, dict] = {}
        self._held: dict[int, set[str]] = {}

    def config(self, level: int) -> dict:
        """The task's config fields at ``level`` (the recipe's task_settings kept)."""
        from grpo_cli.data.tasks import task_config

        if level not in self._configs:
            given = {k: v for k, v in self.data.task_settings.items() if k not in ("seed", "size")}
            self._configs[level] = task_config(self.name, given, level)
        return self._configs[level]

    def held_out_questions(self, level: int) -> set[str]:
        """The questions of the held-out items at ``level``, which no training row there may ask."""
        from grpo_cli.data.tasks import held_out_questions

        if level not in self._held:
            seed = (self.data.task_settings or {}).get("seed", 0) or 0
            self._held[level] = held_out_questions(self.name, self.config(level), seed)
        return self._held[level]

    def stage(self, inputs: list[dict], held_out: bool = False) -> list[dict]:
        """The batch's rows at the current level: each row's item (its index and seed) generated again there. A
        training row whose item there asks a held-out question (of the held-out items at this level or as loaded)
        takes the next index that does not, so training and held-out items stay apart at every level and the
        sampler's order stays what it was; ``held_out``: the rows are the held-out items themselves."""
        from grpo_cli.data import to_examples
        from grpo_cli.data.tasks import TASK_COLUMN, entry

        if self.level == self.start:
            return inputs
        config, staged = self.config(self.level), []
        skip = set() if held_out else self.held_out_questions(self.level) | self.held_out_questions(self.start)
        for row in inputs:
            task = json.loads(row[TASK_COLUMN])
            task["config"] = {**config, "seed": task["config"]["seed"], "size": task["config"]["size"]}
            first = task["index"]
            for index in range(first, first + LOOKAHEAD):  # a small task space may hold no other item: keep the row's
                task["index"] = index
                key = json.dumps(task, sort_keys=True)
                _, item = entry(key)
                if item["question"] not in skip:
                    break
            else:
                task["index"] = first
                key = json.dumps(task, sort_keys=True)
                _, item = entry(key)
            answer = "" if item.get("answer") is None else str(item["answer"])
            (example,), _ = to_examples([{"question": item["question"], "answer": answer, TASK_COLUMN: key}], self.data)
            staged.append({**row, **example})
        return staged

    def observe(self, scores, group: int) -> str | None:
        """A batch's task scores (one per completion, in group order): the level moves when the window says so;
        returns a line saying why, or None."""
        import torch

        scores = torch.nan_to_num(scores.float(), nan=0.0)
        self.scores.append(float(scores.mean()))
        self.failed.append(float((scores.view(-1, group).amax(dim=1) <= 0).float().mean()))
        if len(self.scores) < self.scores.maxlen:
            return None
        mean, failed = sum(self.scores) / len(self.scores), sum(self.failed) / len(self.failed)
        window = f"over the last {len(self.scores)} batches"
        if self.follows == "batch" and mean >= self.settings["raise_at"] and self.level < self.top:
            return self._move(+1, f"mean task score {mean:.2f} {window} reached {self.settings['raise_at']:g}")
        if failed >= self.settings["lower_at"] and self.level > 0:
            why = f"{failed:.0%} of groups failed every completion {window} (lower_at {self.settings['lower_at']:g})"
            return self._move(-1, why)
        return None

    def held_out(self, accuracy: float, level: int) -> str | None:
        """A held-out evaluation's accuracy on its items generated at ``level`` (``follow: held_out``): the level
        goes up when it reaches ``raise_at``; returns a line saying why, or None. A reading at another level than
        the current one says nothing about it and is left alone."""
        if self.follows != "held_out" or level != self.level:
            return None
        if accuracy >= self.settings["raise_at"] and self.level < self.top:
            return self._move(
                +1, f"held-out accuracy {accuracy:.2f} at level {level} reached {self.settings['raise_at']:g}"
            )
        return None

    def _move(self, by: int, why: str) -> str:
        before, self.level = self.level, self.level + by
        self.scores.clear()
        self.failed.clear()
        return f"curriculum: {self.name} level {before} -> {self.level}: {why}"

    def state(self) -> dict:
        return {"level": self.level, "scores": list(self.scores), "failed": list(self.failed)}

    def resume(self, checkpoint) -> None:
        """The level and window a checkpoint saved (``STATE``); a checkpoint without one keeps the start."""
        path = checkpoint / STATE
        if path.is_file():
            state = json.loads(path.read_text())
            self.level = int(state["level"])
            self.scores.extend(state.get("scores", []))
            self.failed.extend(state.get("failed", []))
            print(f"curriculum: {self.name} resumes at level {self.level}")


def for_run(data: DataSettings) -> Curriculum | None:
    return Curriculum(dataclasses.replace(data)) if data.curriculum else None
