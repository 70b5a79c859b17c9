"""The real Unsloth API, read from the installed library's own source files.

Unsloth's GPU code cannot be imported on CPU (it needs Triton), so the fakes that stand in for it are held to its
source with ``ast``: the parameters of a function, the attributes it sets on a model, a small pure helper compiled
on its own. A later Unsloth that moves or renames any of these fails the tests that use them.
"""

import ast
import importlib.machinery
from functools import cache
from pathlib import Path


def source_file(module: str) -> Path:
    """The installed file of ``module``, found on sys.path without importing it (and past any fake in sys.modules)."""
    top, *rest = module.split(".")
    spec = importlib.machinery.PathFinder.find_spec(top)
    assert spec is not None and spec.submodule_search_locations, f"{top} is not installed"
    path = Path(spec.submodule_search_locations[0]).joinpath(*rest)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@cache
def _tree(module: str) -> ast.Module:
    return ast.parse(source_file(module).read_text())


def definition(module: str, qualname: str) -> ast.FunctionDef | ast.ClassDef:
    """``Class.method`` or ``function`` as defined at the top of ``module``."""
    node = _tree(module)
    for part in qualname.split("."):
        found = [
            n for n in node.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part
        ]  # fmt: skip
        assert found, f"{module} no longer defines {qualname} ({source_file(module)})"
        node = found[-1]
    return node


def parameters(module: str, qualname: str) -> list[str]:
    """Parameter names, in order (keyword-only ones last), as the source declares them."""
    args = definition(module, qualname).args
    return [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]


def attributes_set(module: str, qualname: str, on: str = "model") -> dict[str, set[str]]:
    """Every ``on.NAME = VALUE`` inside the function: NAME -> the VALUEs as source text."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(definition(module, qualname)):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == on:
                    found.setdefault(target.attr, set()).add(ast.unparse(node.value))
    return found


def compiled(module: str, name: str):
    """A small self-contained function of ``module``, compiled alone from its source."""
    node = definition(module, name)
    namespace: dict = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(source_file(module)), "exec"), namespace)
    return namespace[name]


def source(module: str, qualname: str) -> str:
    return ast.unparse(definition(module, qualname))
