"""reasoning-gym's procedural tasks (``--dataset reasoning-gym:TASK``), generated offline from a seed: the task's
settings and difficulty from the recipe, held-out items from a seed of their own, and for each row the key that
regenerates its entry, which the task's own verifier scores (rewards/tasks.py)."""

import dataclasses
import datetime
import difflib
import enum
import json
import types
import typing
from functools import lru_cache

from grpo_cli.errors import GrpoError

PREFIX = "reasoning-gym"
TASK_COLUMN = "task"  # {"name", "config", "index"} as JSON: what regenerates the row's entry
HELD_OUT = 200  # held-out items a task's test split holds
TEST_SEED = 1 << 31  # the test split's seed, this far from the training one: their item seeds never meet
DEFAULT_SIZE = 500  # reasoning-gym's own default


def _registry():
    try:
        from reasoning_gym import factory
    except ModuleNotFoundError as exc:
        raise GrpoError(
            "reasoning-gym tasks need the reasoning-gym package: pip install reasoning-gym==0.1.25 (make install does)"
        ) from exc
    return factory


def task_name(dataset: str) -> str:
    """``reasoning-gym:chain_sum`` -> ``chain_sum``, checked against reasoning-gym's registry.

    >>> task_name("reasoning-gym:chain_sum")
    'chain_sum'
    """
    name = dataset.partition(":")[2].strip()
    tasks = _registry().DATASETS
    if name not in tasks or name == "composite":
        close = difflib.get_close_matches(name, list(tasks), n=1)
        hint = f"did you mean {PREFIX}:{close[0]}? " if close else ""
        raise GrpoError(
            f"{dataset}: reasoning-gym has no task {name!r}: {hint}its {len(tasks)} tasks include "
            f"{', '.join(sorted(tasks)[:8])}, ... (python -c 'import reasoning_gym; print(sorted(reasoning_gym.factory.DATASETS))')"
        )
    return name


def curriculum_fields(name: str) -> set[str]:
    """The config fields reasoning-gym's curriculum for the task sets; none where the task has no curriculum."""
    factory = _registry()
    if not factory.has_curriculum(name):
        return set()
    fields = set()
    for attr in factory.create_curriculum(name).attributes.values():
        fields |= {getattr(attr, k) for k in ("field_name", "lower_field_name", "upper_field_name") if hasattr(attr, k)}
    return fields


def levels(name: str) -> int:
    """How many difficulty levels the task's curriculum has (its longest attribute); 0 without a curriculum."""
    factory = _registry()
    if not factory.has_curriculum(name):
        return 0
    return max(len(attr.levels) for attr in factory.create_curriculum(name).attributes.values())


def start_level(data) -> int | None:
    """The level a run's task items load at: its ``difficulty``, or with a curriculum and none given the
    curriculum's start, level 0 (not reasoning-gym's default settings, which sit at no level of it)."""
    if data.difficulty is None and data.curriculum:
        return 0
    return data.difficulty


def task_config(name: str, settings: dict, difficulty: int | None) -> dict:
    """The task's config fields as the recipe gives them: ``task_settings`` over reasoning-gym's defaults, and with a
    ``difficulty`` the fields the task's curriculum sets at that level. Checked by the task's own ``validate``; a
    bad name or value is one line."""
    factory = _registry()
    config_cls = factory.DATASETS[name][1]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(fields), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise GrpoError(
            f"task_settings: {name} has no setting {unknown[0]!r}: {hint}its settings are "
            f"{', '.join(sorted(fields - {'seed', 'size'}))}, seed and size"
        )
    values = dict(settings)
    if difficulty is not None:
        top = levels(name)
        if not top:
            raise GrpoError(
                f"difficulty: reasoning-gym has no curriculum for {name}, so no levels: drop difficulty and set the "
                "task's own settings in task_settings"
            )
        if not 0 <= difficulty < top:
            raise GrpoError(f"difficulty {difficulty}: {name}'s curriculum has levels 0 to {top - 1}")
        clash = sorted(set(settings) & curriculum_fields(name))
        if clash:
            raise GrpoError(
                f"task_settings: {clash[0]} is set by the difficulty level ({name}'s curriculum): drop it from "
                "task_settings, or drop difficulty"
            )
        curriculum = factory.create_curriculum(name)
        curriculum.set_global_level(difficulty)
        values = dataclasses.asdict(curriculum.generate_configuration(values))
    try:
        hints = typing.get_type_hints(config_cls)
        config = config_cls(**{k: _revive(hints.get(k), v) for k, v in values.items()})  # dates given as text, ...
        if hasattr(config, "validate"):
            config.validate()
    except (AssertionError, ValueError, TypeError) as exc:
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GrpoError(f"task_settings for {name} do not hold ({said}): change them in the recipe") from exc
    plain = json.loads(json.dumps(dataclasses.asdict(config), default=_plain))  # what a row's key holds
    return {k: v for k, v in plain.items() if k not in ("seed", "size")}


def _plain(value):
    """A config value JSON has no type for, as JSON: an enum its value, a date or time its ISO text."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _revive(kind, value):
    """A config value read back from JSON as the config field's type has it (enums, dates, tuples, nested
    dataclasses), which the task's generator expects."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        for arg in (a for a in args if a is not type(None)):
            try:
                return _revive(arg, value)
            except (TypeError, ValueError):
                continue
        return value
    if origin is list and args:
        return [_revive(args[0], v) for v in value]
    if origin is tuple and args:
        return tuple(_revive(args[0] if args[-1] is Ellipsis else args[i], v) for i, v in enumerate(value))
    if origin is dict and len(args) == 2:
        return {k: _revive(args[1], v) for k, v in value.items()}
    if not isinstance(kind, type):
        return value
    if issubclass(kind, enum.Enum):
        return kind(value)
    if issubclass(kind, (datetime.date, datetime.time)) and isinstance(value, str):
        return kind.fromisoformat(value)
    if dataclasses.is_dataclass(kind) and isinstance(value, dict):
        hints = typing.get_type_hints(kind)
        return kind(**{k: _revive(hints.get(k), v) for k, v in value.items()})
    return value


@lru_cache(maxsize=64)
def _dataset(name: str, config: str):
    hints = typing.get_type_hints(_registry().DATASETS[name][1])
    return _registry().create_dataset(name, **{k: _revive(hints.get(k), v) for k, v in json.loads(config).items()})


def entry(key: str) -> tuple[object, dict]:
    """The task's dataset and the entry (question, answer, metadata) a row's ``task`` key names, regenerated."""
    task = json.loads(key)
    dataset = _dataset(task["name"], json.dumps(task["config"], sort_keys=True))
    return dataset, dataset[task["index"]]


def _items(name: str, config: dict, seed: int, count: int, skip: set[str] = frozenset()) -> list[dict]:
    """``count`` rows from the task's seeded stream, leaving out questions in ``skip``."""
    config = {**config, "seed": seed, "size": max(count * 2, DEFAULT_SIZE)}
    dataset = _dataset(name, json.dumps(config, sort_keys=True))
    rows, index = [], 0
    while len(rows) < count and index < 20 * count + 100:  # a small task space runs out: stop there
        item = dataset[index]
        if item["question"] not in skip:
            key = json.dumps({"name": name, "config": config, "index": index}, sort_keys=True)
            answer = item.get("answer")
            rows.append(
                {"question": item["question"], "answer": "" if answer is None else str(answer), TASK_COLUMN: key}
            )
        index += 1
    return rows


def held_out_questions(name: str, config: dict, seed: int) -> set[str]:
    """The questions of the task's held-out items at ``config`` (the training ``seed``'s test split)."""
    return {r["question"] for r in _items(name, config, seed + TEST_SEED, HELD_OUT)}


def rows(settings) -> list[dict]:
    """The task's rows for ``settings.split``: ``test`` is the first HELD_OUT items of a seed of its own; ``train``
    the task's ``size`` items (task_settings, reasoning-gym's default 500) of its ``seed`` (0), without any question
    the test split holds."""
    name = task_name(settings.dataset)
    given = dict(settings.task_settings or {})
    seed, size = given.pop("seed", 0) or 0, given.pop("size", DEFAULT_SIZE)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GrpoError(f"task_settings: seed must be a whole number, got {seed!r}")
    if not isinstance(size, int) or size <= 0:
        raise GrpoError(f"task_settings: size must be a positive number of items, got {size!r}")
    config = task_config(name, given, start_level(settings))
    if settings.split not in ("train", "test"):
        raise GrpoError(f"{settings.dataset} has the splits train and test, not {settings.split!r}")
    held_out = _items(name, config, seed + TEST_SEED, HELD_OUT)
    if settings.split == "test":
        return held_out
    train = _items(name, config, seed, size, {r["question"] for r in held_out})
    if not train:
        raise GrpoError(
            f"{settings.dataset}: every item of these settings is among the {HELD_OUT} held out: widen the task "
            "(a higher difficulty or wider task_settings)"
        )
    return train
