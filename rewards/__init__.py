"""Reward functions by name. A reward is ``f(prompts, completions, **columns) -> list[float]``."""

import difflib
import functools
import importlib
import importlib.util
import math
import signal
import threading
import time
from pathlib import Path

from grpo_cli.errors import GrpoError
from rewards.code import code_block_reward, code_io_reward, code_tests_reward
from rewards.format import answer_tag_reward, numbers_used_reward, tool_use_reward
from rewards.numeric import numeric_correctness_reward
from rewards.reference import (
    completion_text,
    correctness_reward,
    int_reward,
    soft_format_reward,
    strict_format_reward,
    xmlcount_reward,
)
from rewards.tasks import task_score_reward

REWARDS = {
    "xmlcount": xmlcount_reward,
    "soft_format": soft_format_reward,
    "strict_format": strict_format_reward,
    "integer": int_reward,
    "correctness": correctness_reward,
    "numeric_correctness": numeric_correctness_reward,
    "answer_tag": answer_tag_reward,
    "numbers_used": numbers_used_reward,
    "tool_use": tool_use_reward,
    "code_tests": code_tests_reward,
    "code_io": code_io_reward,
    "code_block": code_block_reward,
    "task_score": task_score_reward,
}

REFERENCE_REWARDS = ["xmlcount", "soft_format", "strict_format", "integer", "correctness"]


def split_weight(spec: str) -> tuple[str, float]:
    """``"name:0.5"`` -> ``("name", 0.5)``; a spec without a numeric tail weighs 1.0.

    >>> split_weight("correctness:2"), split_weight("my_rewards.py:brevity")
    (('correctness', 2.0), ('my_rewards.py:brevity', 1.0))
    """
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def load_object(target: str, what: str = "reward", kind: str = "function"):
    """``package.module:NAME`` or ``path/to/file.py:NAME`` -> the object, or one line on what is wrong."""
    where, _, attr = target.rpartition(":")
    if not where or not attr:
        raise GrpoError(f"{what} {target!r} names no {kind if where else 'module'}: give module:{kind}")
    path = Path(where).expanduser()
    if where.endswith(".py") or path.is_file():
        if path.is_dir():
            raise GrpoError(f"{what} file {where} is a folder: give path/to/file.py:{kind}")
        if not path.is_file():
            raise GrpoError(f"{what} file {where} does not exist: give an existing path/to/file.py:{kind}")
        if path.suffix != ".py":
            raise GrpoError(f"{what} file {where} is not a .py file: put the {what} in a Python file, file.py:{kind}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # a file that calls sys.exit() or exit() on import
            raise GrpoError(f"{what} file {where} failed to import ({_first_line(exc)}): fix it and retry") from exc
    else:
        try:
            module = importlib.import_module(where)
        except (Exception, SystemExit) as exc:
            raise GrpoError(
                f"{what} module {where} does not import ({_first_line(exc)}): check the name and PYTHONPATH"
            ) from exc
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        close = difflib.get_close_matches(attr, public, n=1)
        hint = f"did you mean {close[0]}?" if close else f"its functions: {', '.join(public[:10]) or 'none'}"
        raise GrpoError(f"{where} has no {attr!r}: {hint}")
    func = getattr(module, attr)
    if not callable(func):
        raise GrpoError(f"{target} is not a callable in {where}: name a {kind} defined there")
    return func


def resolve(spec: str):
    """``NAME[:WEIGHT]`` (a registry name, ``pkg.module:function`` or ``file.py:function``) -> (function, weight)."""
    target, weight = split_weight(spec)
    if not math.isfinite(weight):
        raise GrpoError(
            f"reward {spec}: the weight {weight} is not a finite number: give NAME:WEIGHT, as correctness:2"
        )
    head, sep, tail = target.rpartition(":")
    if sep and head in REWARDS:
        raise GrpoError(f"reward {spec}: the weight {tail!r} is not a number: give NAME:WEIGHT, as {head}:0.5")
    if target in REWARDS:
        return REWARDS[target], weight
    if ":" in target:
        return load_object(target), weight
    close = difflib.get_close_matches(target, REWARDS, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise GrpoError(
        f"unknown reward {target!r}: {hint}choose from {', '.join(REWARDS)}, "
        "or give package.module:function or path/to/file.py:function"
    )


class RewardError(GrpoError):
    """A reward failed while training: it raised, hung, returned the wrong count or a non-finite value."""


def checked(func, timeout: float | None = None, nan: str = "error"):
    """Wrap a reward so a failure names the reward and the example, a wrong count or a NaN/inf is caught, and a
    call longer than ``timeout`` seconds stops the run instead of freezing it. With ``nan="skip"`` a non-finite
    value becomes None (TRL leaves that sample out of that reward) and is counted in ``wrapper.skipped``.

    >>> checked(lambda prompts, completions: [float("nan")] * len(completions), nan="skip")(["p"], ["c"])
    [None]
    """
    name = getattr(func, "__name__", repr(func))

    @functools.wraps(func)
    def wrapper(prompts, completions, **kwargs):
        try:
            values = call_within(func, timeout, prompts=prompts, completions=completions, **kwargs)
        except RewardTimeout as exc:
            raise RewardError(
                f"reward {name} took longer than {timeout:g}s on {len(completions)} completions: make it faster, "
                "or raise reward_timeout in the recipe"
            ) from exc
        except Exception as exc:
            example = _first_failing(func, timeout, prompts, completions, kwargs)
            raise RewardError(
                f"reward {name} raised {type(exc).__name__}: {exc} on {example!r}: fix the reward function"
            ) from exc
        if values is None or len(values) != len(completions):
            got = "None" if values is None else f"{len(values)} values"
            raise RewardError(
                f"reward {name} returned {got} for {len(completions)} completions: return one float per completion"
            )
        bad = [i for i, v in enumerate(values) if v is not None and not math.isfinite(v)]
        if bad and nan != "skip":
            text = completion_text(completions[bad[0]])
            raise RewardError(
                f"reward {name} returned {values[bad[0]]} on {text[:80]!r}: return finite numbers, "
                "or set reward_nan: skip to leave such samples out"
            )
        wrapper.skipped += len(bad)
        return [None if i in bad else v for i, v in enumerate(values)] if bad else values

    wrapper.skipped = 0
    return wrapper


class RewardTimeout(Exception):
    """A reward call ran past its time limit (our own, so a reward's own TimeoutError is reported as raised)."""


class _Expired(BaseException):  # BaseException: a reward's ``except Exception`` cannot swallow the interrupt
    pass


def call_within(func, timeout: float | None, **kwargs):
    """``func(**kwargs)``; past ``timeout`` seconds a timer interrupts it with a signal (SIGUSR1), so that a hung
    reward cannot hold the run. The call stays in the main thread: rewards that use signals themselves (math-verify
    times its parsing with SIGALRM) keep working. Elsewhere than the main thread there is no limit."""
    if not timeout or threading.current_thread() is not threading.main_thread():
        return func(**kwargs)
    done = False

    def expire(signum, frame):
        if not done:  # a signal that lands after the call returned is absorbed
            raise _Expired

    previous = signal.signal(signal.SIGUSR1, expire)
    timer = threading.Timer(timeout, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    timer.daemon = True
    try:
        timer.start()
        try:
            return func(**kwargs)
        finally:
            done = True
    except _Expired:
        raise RewardTimeout(timeout) from None
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, signal.SIG_DFL if previous is None else previous)


def _first_failing(func, timeout, prompts, completions, kwargs) -> str:
    """The first completion the reward raises on alone, searched within one timeout in all."""
    deadline = time.monotonic() + (timeout or float("inf"))
    for i in range(len(completions)):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        one = {k: v[i : i + 1] if isinstance(v, list) and len(v) == len(completions) else v for k, v in kwargs.items()}
        try:
            call_within(
                func,
                None if left == float("inf") else left,
                prompts=prompts[i : i + 1],
                completions=completions[i : i + 1],
                **one,
            )
        except RewardTimeout:
            break
        except Exception:
            text = completion_text(completions[i])
            return text[:80]
    return "the batch"
