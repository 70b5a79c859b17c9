"""Tools and environments for agentic GRPO: named in flags or a recipe, checked before any model loads, run so that
none can end a run, and the chat template that carries them.

A tool is a function whose type hints and docstring describe it to the model (transformers' ``get_json_schema``
reads them, and TRL renders them into the prompt). An environment is a class: each rollout has an instance (TRL reuses
them across batches), ``reset(**row)`` is called before it, offers its public methods as tools, and scores with its ``get_reward`` if it has
one. The same tool loop runs in training (TRL's ``_tool_call_loop``), and in ``infer``, ``eval``, ``--dry-run``
and the held-out evaluation (``converse`` in grpo_cli/generate.py), with the same parser and the same tools."""

import ast
import dataclasses
import functools
import inspect
import operator
import os
import pickle
import selectors
import signal
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from grpo_cli.errors import GrpoError

# --- Built-in tools -----------------------------------------------------------------------------------------------

_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}  # fmt: skip


def _number(node):
    """The value of an arithmetic expression tree: numbers and the operators above, nothing else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _number(node.left), _number(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10**6):
            raise ValueError("the power is too large: keep exponents at 64 or below")
        if max(abs(left), abs(right)) > 10**30:
            raise ValueError("the numbers are too large: keep them below 10**30")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_number(node.operand))
    raise ValueError(f"only numbers and + - * / // % ** ( ) are allowed, not {ast.unparse(node)!r}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return its value.

    Args:
        expression: The arithmetic to evaluate, with numbers, + - * / // % ** and parentheses, as 123 * (45 + 6).
    """  # no doctest here: the whole docstring is what the model reads (tests/test_tools.py has the examples)
    try:
        tree = ast.parse(str(expression).strip().replace("^", "**").replace("×", "*").replace(",", ""), mode="eval")
    except SyntaxError:
        raise ValueError(f"{expression!r} is not an arithmetic expression") from None
    try:
        value = _number(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 10) if isinstance(value, float) else value)


def python(code: str) -> str:
    """Run a Python program and return what it prints (standard output, then any error).

    Args:
        code: A complete Python program; print the values you want to see.
    """
    from grpo_cli import sandbox

    result = sandbox.current().run(sandbox.Program(code))
    if result.timed_out:
        raise TimeoutError(f"the program ran past {sandbox.current().limits.wall_seconds:g}s and was stopped")
    out = result.stdout[-2000:]
    if result.returncode:
        out += f"\n{result.stderr.strip()[-1000:]}\nexit status {result.returncode}"
    return out.strip() or "(the program printed nothing)"


BUILTIN = {"calculator": calculator, "python": python}


# --- Loading and checking, before any model loads -----------------------------------------------------------------


def describe(func: Callable, what: str) -> dict:
    """The JSON schema the model is shown for ``func``, or one line saying what its hints or docstring lack."""
    from transformers.utils import get_json_schema

    if not callable(func):
        raise GrpoError(f"{what} is not callable: name a function")
    try:
        return get_json_schema(func)
    except Exception as exc:  # transformers' TypeHintParsingException and DocstringParsingException say what is missing
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GrpoError(
            f"{what}: {said}: give every argument a type hint, and a Google-style docstring with a line per "
            "argument under Args:"
        ) from None


def environment_methods(cls) -> list[str]:
    """The methods TRL offers as tools: public functions on the class, other than reset and get_reward."""
    return [
        name
        for name, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]


def load_tool(spec: str) -> Callable:
    """A built-in tool's name, ``package.module:function`` or ``path/to/file.py:function`` -> the checked function."""
    from rewards import load_object

    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise GrpoError(
            f"tool {spec!r} is not a built-in tool ({', '.join(BUILTIN)}): give one of those, "
            "or path/to/file.py:function or package.module:function"
        )
    func = load_object(spec, what="tool")
    if inspect.isclass(func):
        raise GrpoError(f"tool {spec} is a class: give a function, or pass the class as --environment")
    _not_async(func, f"tool {spec}")
    describe(func, f"tool {spec}")
    return func


def load_environment(spec: str) -> type:
    """``path/to/file.py:Class`` or ``package.module:Class`` -> the checked class: it has ``reset``, and each of its
    public methods describes itself as a tool does."""
    from rewards import load_object

    cls = load_object(spec, what="environment", kind="Class")
    if not inspect.isclass(cls):
        raise GrpoError(f"environment {spec} is not a class: give a class with reset() and its tool methods")
    if not callable(getattr(cls, "reset", None)):
        raise GrpoError(f"environment {spec} has no reset(): add `def reset(self, **row)`, called before each rollout")
    methods = environment_methods(cls)
    if not methods and not callable(getattr(cls, "get_reward", None)):
        raise GrpoError(f"environment {spec} offers no tool: add a public method with type hints and a docstring")
    for name in methods:
        _not_async(getattr(cls, name), f"environment {spec}, method {name}")
        describe(getattr(cls, name), f"environment {spec}, method {name}")
    return cls


def _not_async(func: Callable, what: str) -> None:
    if inspect.iscoroutinefunction(func):
        raise GrpoError(f"{what} is async: give a plain function (grpo runs each call with a time limit and waits)")


# --- Running: no tool ends a run ----------------------------------------------------------------------------------


class ToolTimeout(Exception):
    """A tool call ran past ``tool_timeout`` and was stopped; the model is told so, and the call counts as failed."""


def _exit_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _run_and_send(func: Callable, kwargs: dict, write: int) -> None:
    """In a tool call's child: run, send the outcome, leave at once (no atexit, no finalizers of the parent's).
    The tool's printing goes nowhere (it would tear the progress display)."""
    try:
        import sys

        devnull = open(os.devnull, "w")
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        sys.stdout = sys.stderr = devnull  # fresh streams: another thread may hold the old ones' locks
        try:
            value = func(**kwargs)
            payload = pickle.dumps(("ok", value if isinstance(value, list) else str(value)))
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too: all are reported
            payload = pickle.dumps(("error", f"{type(exc).__name__}: {exc}"))
        with os.fdopen(write, "wb") as pipe:
            pipe.write(payload)
    finally:
        os._exit(0)


_NUMBER = struct.Struct("q")


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


class ForkServer:
    """The process each file tool call is forked from: forked from this one when the tools are resolved, before
    any model, CUDA context, NCCL or vLLM thread exists here. Forking the trainer itself would copy its page tables
    at each call (about 40 ms a GiB resident on a 2-core EPYC: 0.48 s for 12 GiB) and take along the locks its
    threads hold. A call sends the tool's index, its arguments and the write end of a fresh pipe; the server forks
    the call's child, says its pid (to be killed at the time limit), waits for it and says how it ended."""

    def __init__(self, funcs: list[Callable]):
        mine, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            mine.close()
            try:
                self._serve(theirs, funcs)
            finally:
                os._exit(0)
        theirs.close()
        self.pid, self.sock, self.lock = pid, mine, threading.Lock()
        weakref.finalize(self, ForkServer._stop, pid, mine)

    @staticmethod
    def _serve(sock: socket.socket, funcs: list[Callable]) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the run, which stops this server
        while True:
            try:
                header, fds, _, _ = socket.recv_fds(sock, _NUMBER.size, 1)
                if not header:
                    return  # the run is gone
                (write,) = fds
                index, kwargs = pickle.loads(_receive(sock, _NUMBER.unpack(_receive_rest(sock, header))[0]))
            except (EOFError, OSError, ValueError):
                return
            pid = os.fork()
            if pid == 0:
                sock.close()
                _run_and_send(funcs[index], kwargs, write)
            os.close(write)
            sock.sendall(_NUMBER.pack(pid))
            _, status = os.waitpid(pid, 0)
            sock.sendall(_NUMBER.pack(status))

    @staticmethod
    def _stop(pid: int, sock: socket.socket) -> None:
        sock.close()  # the server reads the end of its socket and leaves
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

    def call(self, index: int, kwargs: dict, timeout: float | None):
        """Tool ``index`` on ``kwargs`` in a child of the server: its value, or the error the model reads."""
        payload = pickle.dumps((index, kwargs))
        with self.lock:
            read, write = os.pipe()
            try:
                socket.send_fds(self.sock, [_NUMBER.pack(len(payload))], [write])
            finally:
                os.close(write)
            self.sock.sendall(payload)
            pid = _NUMBER.unpack(_receive(self.sock, _NUMBER.size))[0]
            deadline = None if not timeout else time.monotonic() + timeout
            chunks, done = [], False
            try:
                with selectors.DefaultSelector() as waiting:  # any descriptor number, unlike select()
                    waiting.register(read, selectors.EVENT_READ)
                    while True:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise ToolTimeout(f"the tool ran past {timeout:g}s and was stopped")
                        if waiting.select(left):
                            chunk = os.read(read, 1 << 16)
                            if not chunk:
                                break
                            chunks.append(chunk)
                done = True
            finally:
                os.close(read)
                if not done:  # stopped early (timeout, Ctrl-C): the child goes; the server reaps it
                    os.kill(pid, signal.SIGKILL)
                status = _NUMBER.unpack(_receive(self.sock, _NUMBER.size))[0]
        if not chunks:
            raise RuntimeError(f"the tool {_exit_status(status)} before returning")
        kind, value = pickle.loads(b"".join(chunks))
        if kind == "error":
            raise RuntimeError(value)
        return value


def _receive_rest(sock: socket.socket, header: bytes) -> bytes:
    return header + (_receive(sock, _NUMBER.size - len(header)) if len(header) < _NUMBER.size else b"")


def in_child(server: ForkServer, index: int, func: Callable, timeout: float | None) -> Callable:
    """``func`` (the server's tool ``index``) run in a child of the fork server at each call: a tool that hangs is
    killed at ``timeout`` seconds, and one that exits, crashes or fills memory ends its child, never the run; either
    way the model reads an error. The result comes back as TRL would show it: a list of content parts as it is,
    anything else as text."""

    @functools.wraps(func)
    def call(**kwargs):
        return server.call(index, kwargs, timeout)

    return call


def in_process(func: Callable, timeout: float | None) -> Callable:
    """``func`` called in this process (an environment's method changes its instance), stopped by a signal at
    ``timeout`` seconds; SystemExit from it becomes an error, as any other exception does."""
    from rewards import RewardTimeout, call_within

    @functools.wraps(func)
    def call(*args, **kwargs):
        try:
            return call_within(lambda: func(*args, **kwargs), timeout)
        except RewardTimeout:
            raise ToolTimeout(f"the tool ran past {timeout:g}s and was stopped") from None
        except SystemExit as exc:
            raise RuntimeError(f"the tool called exit({exc.code})") from None

    return call


def guarded_environment(cls: type, timeout: float | None) -> type:
    """A subclass of ``cls`` whose tool methods stop at ``timeout`` seconds. Its name and methods are the
    user's own, so TRL names the reward and renders the tools as it would for ``cls``."""

    def guarded(name):
        raw = inspect.getattr_static(cls, name)
        if isinstance(raw, staticmethod):
            return staticmethod(in_process(raw.__func__, timeout))
        return in_process(getattr(cls, name), timeout)

    methods = {name: guarded(name) for name in environment_methods(cls)}
    return type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__, "__doc__": cls.__doc__})


# --- The tools of a run -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Toolset:
    """The tools a run offers, guarded, and its environments: ``environments`` maps the data's ``environment``
    column to a class (one key, None, when a single class serves every row)."""

    names: list[str]
    tools: list[Callable]
    environments: dict | None
    max_iterations: int
    timeout: float | None
    template: str = ""  # which chat template and parser carry the tools, said once loaded
    rollout_template: str | None = None  # the prefix-preserving template TRL renders rollouts with, where needed

    @property
    def environment_factory(self):
        """As TRL's ``environment_factory`` takes it: a class, or a mapping of names to classes."""
        if self.environments is None:
            return None
        return self.environments[None] if list(self.environments) == [None] else self.environments

    def for_row(self, row: dict) -> tuple[dict[str, Callable], object | None, str | None]:
        """The tools one rollout may call, by name, with its environment made and reset as TRL does; also that
        environment (for its get_reward) and what reset returned (added to the last user message)."""
        tools = {tool.__name__: tool for tool in self.tools}
        if not self.environments:
            return tools, None, None
        key = row.get("environment") if None not in self.environments else None
        if key not in self.environments:
            raise GrpoError(
                f"a row names environment {key!r}: the recipe's environments are {list(self.environments)}; "
                "infer has no data row to pick one by: use grpo eval"
            )
        environment = self.environments[key]()
        arguments = {k: v for k, v in row.items() if k != "environment"} if key is not None else row
        try:
            observation = environment.reset(**arguments)
        except Exception as exc:
            name = type(environment).__name__
            raise GrpoError(
                f"environment {name}'s reset failed on a row with {sorted(arguments)} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                "let reset take the data's columns as keyword arguments, with **row for the rest"
            ) from None
        tools |= {name: getattr(environment, name) for name in environment_methods(type(environment))}
        return tools, environment, observation

    def schemas(self) -> list[Callable]:
        """The callables whose schemas a prompt may show: the tools and every environment's methods (the longest a
        prompt can be, for max_prompt_length)."""
        tools = list(self.tools)
        for cls in (self.environments or {}).values():
            tools += [getattr(cls, name) for name in environment_methods(cls)]
        return tools

    def describe(self) -> dict:
        """What grpo.json and the model card keep, for ``infer --lora`` to offer the same tools again."""
        return {"tools": self.names, "max_tool_calling_iterations": self.max_iterations, "tool_timeout": self.timeout}


def resolve(data) -> Toolset | None:
    """The run's tools and environments from its data settings, each checked; None when it has none."""
    if not data.tools and not data.environment:
        return None
    tools = [load_tool(spec) for spec in data.tools]
    names = [getattr(tool, "__name__", "") for tool in tools]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise GrpoError(f"two tools are named {repeated[0]!r}: the model calls tools by name, so rename one")
    files = [tool for tool in tools if tool not in BUILTIN.values()]
    server = ForkServer(files) if files else None  # now, while this process is small and has no model or thread
    guarded = [
        tool if tool in BUILTIN.values() else in_child(server, files.index(tool), tool, data.tool_timeout)
        for tool in tools
    ]
    environments = None
    if isinstance(data.environment, str):
        environments = {None: guarded_environment(load_environment(data.environment), data.tool_timeout)}
    elif isinstance(data.environment, dict):
        environments = {
            str(key): guarded_environment(load_environment(str(spec)), data.tool_timeout)
            for key, spec in data.environment.items()
        }
    for cls in (environments or {}).values():
        shared = sorted(set(names) & set(environment_methods(cls)))
        if shared:
            raise GrpoError(
                f"tool {shared[0]!r} is also a method of environment {cls.__name__}: the model calls tools by name, "
                "so rename one"
            )
    listed = list(data.tools) + ([data.environment] if isinstance(data.environment, str) else [])
    listed += [f"{k}={v}" for k, v in data.environment.items()] if isinstance(data.environment, dict) else []
    return Toolset(listed, guarded, environments, data.max_tool_calling_iterations, data.tool_timeout)


# --- The chat template that carries them ----------------------------------------------------------------------------

CHATML_STAND_IN = "qwen2_5.jinja"  # Qwen2.5's tool template over the same <|im_start|> tokens


def _trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / name).read_text()


def _template_name(template: str | None) -> str | None:
    """Which of TRL's stock chat templates ``template`` is, by file name; None if none."""
    import trl

    folder = Path(trl.__file__).parent / "chat_templates"
    return next((p.name for p in sorted(folder.glob("*.jinja")) if p.read_text() == template), None)


def carry_tools(tokenizer, model_name: str) -> tuple[str, str | None]:
    """Give ``tokenizer`` a chat template that carries tools and the parser TRL reads their calls with (TRL's
    ``add_response_schema``, which knows the Llama 3.1/3.2 and Qwen2.5/3 families among others). A ChatML model
    whose own template drops tools (the embedded SmolLM2) gets Qwen2.5's tool template over the same tokens; a
    tokenizer that ships its own response parser keeps it, as TRL does. A template TRL cannot parse calls from is
    refused in one line. Returns the line that says which template and
    parser, and the prefix-preserving template TRL renders multi-turn rollouts with where the model's own is not
    (None where it is)."""
    from trl.chat_template_utils import (
        add_response_schema,
        get_training_chat_template,
        is_chat_template_prefix_preserving,
        supports_tool_calling,
    )

    own, template = tokenizer.chat_template, None
    carries = bool(own) and supports_tool_calling(tokenizer)
    if carries and (getattr(tokenizer, "response_template", None) or getattr(tokenizer, "response_schema", None)):
        template = f"{model_name}'s own, with the response parser it ships"  # TRL keeps a parser that is set
    elif carries:
        try:  # TRL's match (and, once Unsloth is imported, its match of its fixed copies of the same templates)
            add_response_schema(tokenizer)
            template = _template_name(own) or f"{model_name}'s own"
        except ValueError:
            pass
    elif "<|im_start|>" in (own or "") and "<|im_start|>" in tokenizer.get_vocab():
        tokenizer.chat_template = _trl_template(CHATML_STAND_IN)
        add_response_schema(tokenizer)
        template = f"qwen2_5.jinja over {model_name}'s ChatML tokens"
    if template is None:
        tokenizer.chat_template = own
        raise GrpoError(
            f"{model_name}'s chat template cannot carry tool calls that TRL can parse: use a model with the stock "
            "template of Llama 3.1/3.2, Qwen2.5, Qwen3 or another that trl/chat_template_utils.py knows, a ChatML "
            "model whose template drops tools, or a tokenizer that ships its response_template"
        )
    rollout = None
    if not is_chat_template_prefix_preserving(tokenizer):
        try:
            rollout = get_training_chat_template(tokenizer)
        except ValueError:
            tokenizer.chat_template = own
            raise GrpoError(
                f"{model_name}'s chat template rewrites earlier turns once a tool answers, and TRL has no "
                "prefix-preserving version of it: use a model whose template TRL knows"
            ) from None
        template += f" (rollouts rendered with TRL's prefix-preserving {_template_name(rollout) or 'version'})"
    parser = "<tool_call> JSON" if "<tool_call>" in tokenizer.chat_template else "the template's own tool-call syntax"
    return f"Tools: chat template {template}; calls parsed by TRL's response template ({parser})", rollout


UNSLOTH_TEMPLATES = "models/_trl_tool_templates.py"  # Unsloth's matching of its fixed templates to TRL's


def _as_unsloth_matches(tokenizer):
    """The tokenizer with the TRL-known template that renders its own identically, as Unsloth matches them once
    loaded (its fixed copies of hub templates, e.g. unsloth/Meta-Llama-3.1-8B-Instruct's, differ from TRL's by a
    character). Read from Unsloth's module by file: importing unsloth itself sets up its GPU machinery."""
    import importlib.machinery
    import importlib.util

    spec = importlib.machinery.PathFinder.find_spec("unsloth")
    path = Path(spec.submodule_search_locations[0]) / UNSLOTH_TEMPLATES if spec else None
    if path is None or not path.is_file():
        return tokenizer
    try:
        loaded = importlib.util.spec_from_file_location("grpo_unsloth_tool_templates", path)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        return module.with_trl_known_chat_template(tokenizer)
    except Exception:  # noqa: BLE001 - a later Unsloth that moved it: TRL's own matching decides
        return tokenizer


def check_template(model_name: str, plan):
    """``carry_tools`` on the model's tokenizer alone, before any weights load; the tokenizer as the run will
    render prompts with it. Unsloth's matching of its fixed templates applies where the run will have it: its GPU
    backend installs it with its TRL patches (PatchFastRL), the CPU backend and plain TRL (FSDP, ZeRO) have none."""
    from transformers import AutoTokenizer

    from grpo_cli.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_name))
    if plan.unsloth and plan.cuda:
        tokenizer = _as_unsloth_matches(tokenizer)
    carry_tools(tokenizer, model_name)
    return tokenizer
