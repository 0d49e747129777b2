"""A user's own code in a run: plugin modules, and a model or data set named by import path.

A config names user code as ``"package.module:name"`` (``[model] name``,
``[data] dataset``) or as a module (``[compression] plugins``); from Python,
:func:`adaquantfl.run` and :func:`adaquantfl.compare` also take the objects
themselves (:func:`object_name`). Whatever the code raises while it is
imported, a run reports it as one line that names the module and the
exception's first line, never a traceback (a plugin's own code may raise
anything, a ``SyntaxError`` or ``SystemExit`` included).

Notes
-----
An object passed from Python that is reachable by its own import path (a
function or class defined at the top of a module) is named by that path, so
the run's ``config.toml`` says where it came from and the Flower engine's
nodes can import it too. Any other object (a lambda, a local function, an
``nn.Module`` instance) is kept in this process under a ``"python:"`` name:
such a run can only be run, and resumed, from the same Python session.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = [
    "PYTHON_PREFIX",
    "call_factory",
    "import_module",
    "import_object",
    "is_import_path",
    "object_name",
    "python_object",
]

#: Names of objects handed over from Python that have no import path.
PYTHON_PREFIX = "python:"
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_PATH = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}(\.{_IDENTIFIER})*")
_OBJECTS: dict[str, object] = {}


def is_import_path(value: object) -> bool:
    """Whether ``value`` has the form ``"package.module:name"`` (or names a Python object)."""
    if not isinstance(value, str):
        return False
    return bool(_IMPORT_PATH.fullmatch(value)) or value.startswith(PYTHON_PREFIX)


def _failure(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return type(exc).__name__ + (f": {first}" if first else "")


def import_module(name: str, what: str, *, error: type[Exception] = ValueError) -> ModuleType:
    """Import module ``name``; any failure is ``error`` naming ``what``, the module, the cause."""
    if not isinstance(name, str) or not name:
        raise error(f"{what}: a module name is needed, got {name!r:.80}")
    try:
        return importlib.import_module(name)
    except (Exception, SystemExit) as exc:  # the user's module may raise anything
        raise error(f"{what}: cannot import module {name!r}: {_failure(exc)}") from None


def import_object(path: str, what: str, *, error: type[Exception] = ValueError) -> object:
    """The object at ``"package.module:name"`` (or a ``"python:"`` object of this process).

    Raises
    ------
    ValueError
        (or ``error``) naming ``what``, the path and what went wrong.
    """
    if isinstance(path, str) and path.startswith(PYTHON_PREFIX):
        if path not in _OBJECTS:
            raise error(
                f"{what} was handed over from Python in another session; pass the "
                "object again (adaquantfl.run(..., model=..., data=...)), or name it by "
                "import path, 'package.module:name'"
            )
        return _OBJECTS[path]
    if not isinstance(path, str) or not _IMPORT_PATH.fullmatch(path):
        raise error(f"{what} must be an import path 'package.module:name', got {path!r:.80}")
    module_name, _, attribute = path.partition(":")
    obj: object = import_module(module_name, what, error=error)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise error(f"{what}: module {module_name!r} has no {attribute!r}")
        obj = getattr(obj, part)
    return obj


def object_name(obj: object, what: str) -> str:
    """The name a config uses for ``obj``: its own import path where that leads back to it.

    Otherwise a ``"python:"`` name under which this process keeps ``obj``.
    """
    if isinstance(obj, str):
        return obj
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        path = f"{module}:{qualname}"
        try:
            if module != "__main__" and import_object(path, what) is obj:
                return path
        except ValueError:
            pass
    label = qualname if isinstance(qualname, str) else type(obj).__qualname__
    name = f"{PYTHON_PREFIX}{label}#{id(obj):x}"
    _OBJECTS[name] = obj
    return name


def python_object(name: str) -> object | None:
    """The object kept under a ``"python:"`` name, or None."""
    return _OBJECTS.get(name)


def call_factory(factory: Callable[..., Any], what: str, **available: Any) -> Any:
    """Call ``factory`` with those of ``available`` that its signature takes.

    A factory may take any of them by name (``input_shape``, ``num_classes``,
    ``seed``, ...), all of them through ``**kwargs``, or none.
    """
    try:
        parameters = dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        parameters = {}  # e.g. a builtin: call it with nothing
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kwargs = dict(available)
    else:
        kwargs = {k: v for k, v in available.items() if k in parameters}
    try:
        return factory(**kwargs)
    except (Exception, SystemExit) as exc:
        raise ValueError(f"{what}: the factory failed: {_failure(exc)}") from None
