"""The public API (`edge_cbn._API`) documents its arguments, returns and errors in Google style: every
function that takes parameters has `Args:` naming each one, every function whose return annotation is not
None has `Returns:`, every function that raises an exception itself has `Raises:`; a class does the same
for its constructor in its own docstring (`Args:`, or `Attributes:` for a dataclass), and each of its
public methods as a function.  The check is a function returning its problems, run on the package (none)
and on planted violations (each reported)."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap

import edge_cbn

# Modules whose entries are not checked (none: every entry of edge_cbn._API is); a module put here is
# skipped, which the tests below show.
LATER: set = set()


def _section(doc: str, *names: str) -> str | None:
    """The text of the first section called one of `names` (a line `Name:` up to the next such line)."""
    match = re.search(rf"^[ \t]*(?:{'|'.join(names)}):[ \t]*\n((?:.*\n?)*?)(?=^[ \t]*[A-Z]\w*:[ \t]*$|\Z)",
                      doc, re.M)
    return match.group(1) if match else None


def _returns_something(annotation) -> bool:
    return annotation not in (None, "None")  # annotations are strings under `from __future__ import annotations`


def _raises_itself(func) -> bool:
    """The function's own body (not a nested function) has a `raise X` statement (a bare re-raise aside)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):  # no source (generated, built in): nothing to read
        return False
    body = tree.body[0]
    todo = list(ast.iter_child_nodes(body))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Raise) and node.exc is not None:
            return True
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))
    return False


def _documented_names(text: str) -> set[str]:
    """The names a section's entries start with: `name: ...`, `name (type): ...`, `a, b: ...`, `**options: ...`."""
    names = set()
    for entry in re.findall(r"^[ \t]*(\*{0,2}\w+(?:,[ \t]*\*{0,2}\w+)*)(?:[ \t]*\([^)\n]*\))?:", text, re.M):
        names.update(name.strip().lstrip("*") for name in entry.split(","))
    return names


def _parameter_problems(where: str, doc: str, params: list[str], sections: tuple[str, ...]) -> list[str]:
    params = [p for p in params if not p.startswith("_")]
    if not params:
        return []
    text = _section(doc, *sections)
    if text is None:
        return [f"{where}: no {' or '.join(s + ':' for s in sections)} section for {', '.join(params)}"]
    missing = [p for p in params if p not in _documented_names(text)]
    return [f"{where}: {sections[0]} does not name {', '.join(missing)}"] if missing else []


def function_problems(where: str, func, *, method: bool = False) -> list[str]:
    """What the docstring of `func` (a function, or a method taken from its class's `vars`) leaves out."""
    doc = inspect.cleandoc(func.__doc__ or "")
    if not doc:
        return [f"{where}: no docstring"]
    sig = inspect.signature(func)
    names = list(sig.parameters)[1:] if method else list(sig.parameters)
    problems = _parameter_problems(where, doc, names, ("Args",))
    if _returns_something(sig.return_annotation) and _section(doc, "Returns") is None:
        shown = "something" if sig.return_annotation is inspect.Signature.empty else sig.return_annotation
        problems.append(f"{where}: returns {shown} but has no Returns: section")
    if _raises_itself(func) and _section(doc, "Raises") is None:
        problems.append(f"{where}: raises but has no Raises: section")
    return problems


def class_problems(where: str, cls) -> list[str]:
    """The class docstring's constructor sections, then every public method defined in the class itself."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    if dataclasses.is_dataclass(cls) and doc.startswith(cls.__name__ + "("):
        doc = ""  # the signature dataclasses put there when the class has no docstring
    if not doc:
        return [f"{where}: no docstring"]
    sections = ("Attributes", "Args") if dataclasses.is_dataclass(cls) else ("Args", "Attributes")
    problems = _parameter_problems(where, doc, list(inspect.signature(cls).parameters), sections)
    init = vars(cls).get("__init__")
    if inspect.isfunction(init) and _raises_itself(init) and _section(doc, "Raises") is None:
        problems.append(f"{where}: its constructor raises but the class has no Raises: section")
    for name, attr in vars(cls).items():
        if name.startswith("_") or isinstance(attr, property):
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            problems += function_problems(f"{where}.{name}", attr.__func__, method=isinstance(attr, classmethod))
        elif inspect.isfunction(attr):
            problems += function_problems(f"{where}.{name}", attr, method=True)
    return problems


def object_problems(where: str, obj) -> list[str]:
    if inspect.isclass(obj):
        return class_problems(where, obj)
    if callable(obj):
        return function_problems(where, obj)
    return []  # a constant (PRESETS)


def checked_entries(api: dict, later: set) -> dict:
    """{name: object} of the `_API` entries whose module is not in `later`."""
    return {name: getattr(importlib.import_module(module), name) for name, module in api.items()
            if module not in later}


def api_problems(api: dict = edge_cbn._API, later: set = LATER) -> list[str]:
    return [problem for name, obj in checked_entries(api, later).items() for problem in object_problems(name, obj)]


def test_the_public_api_states_arguments_returns_and_errors():
    assert api_problems() == []


def test_the_check_walks_every_entry_outside_later():
    entries = checked_entries(edge_cbn._API, LATER)
    assert set(entries) == {name for name, module in edge_cbn._API.items() if module not in LATER}
    assert {"CalibratedModel", "Bundle", "load_bundle", "Engine", "StreamOptions", "make_noise"} <= set(entries)
    assert LATER <= set(edge_cbn._API.values())  # no stale name in LATER


# ------------------------------------------------------------------------------------ planted violations
def _no_sections(x: int, scale=2.0) -> float:
    """Scale `x`."""
    if x < 0:
        raise ValueError("negative")
    return x * scale


def _args_short_of_one(x: int, scale=2.0) -> float:
    """Scale `x`.

    Args:
        x: the value (the scale is not an entry, even when named here).

    Returns:
        x * scale.
    """
    return x * scale


def _unannotated(x):
    """Twice `x`: no annotation, so it may return something.

    Args:
        x: a number.
    """
    return 2 * x


def _documented(x: int, scale: float = 2.0, *, strict: bool = False) -> float:
    """Scale `x`.

    Args:
        x (int): the value.
        scale: the factor.
        strict: refuse negative values
            (a continuation line).

    Returns:
        x * scale.

    Raises:
        ValueError: `x` < 0 when `strict`.
    """
    def check(value):
        raise AssertionError(value)  # a nested function's raise is its own
    if strict and x < 0:
        raise ValueError("negative")
    return x * scale


def _returns_none(x) -> None:
    """Nothing back.

    Args:
        x: ignored.
    """


class _Planted:
    """A class that says nothing of its constructor."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError("negative size")
        self.size = size

    def grow(self, by: int) -> int:
        """Grow."""
        return self.size + by

    @classmethod
    def make(cls, size: int) -> "_Planted":
        return cls(size)

    @property
    def twice(self) -> int:
        return 2 * self.size

    def _private(self, anything):
        return anything


class _Good:
    """A documented class.

    Args:
        size: how big.
    """

    def __init__(self, size: int):
        self.size = size

    def grow(self, by: int) -> int:
        """Grow.

        Args:
            by: how much.

        Returns:
            The new size.
        """
        return self.size + by

    @staticmethod
    def unit() -> int:
        """One.

        Returns:
            1.
        """
        return 1


@dataclasses.dataclass
class _UndocumentedFields:
    """Fields without a section."""
    width: int = 1


@dataclasses.dataclass
class _NoDocstring:
    width: int = 1


def test_the_check_reports_planted_violations():
    assert function_problems("f", _no_sections) == [
        "f: no Args: section for x, scale", "f: returns float but has no Returns: section",
        "f: raises but has no Raises: section"]
    assert function_problems("f", _args_short_of_one) == ["f: Args does not name scale"]
    assert function_problems("f", _unannotated) == ["f: returns something but has no Returns: section"]
    assert object_problems("C", _Planted) == [
        "C: no Args: or Attributes: section for size", "C: its constructor raises but the class has no Raises: section",
        "C.grow: no Args: section for by", "C.grow: returns int but has no Returns: section",
        "C.make: no docstring"]
    assert object_problems("D", _UndocumentedFields) == ["D: no Attributes: or Args: section for width"]
    assert object_problems("D", _NoDocstring) == ["D: no docstring"]


def test_the_check_accepts_what_is_documented():
    assert function_problems("f", _documented) == []
    assert function_problems("f", _returns_none) == []
    assert object_problems("C", _Good) == []
    assert object_problems("PRESETS", ("none",)) == []


def test_an_entry_of_a_module_taken_out_of_later_is_checked():
    api = {**edge_cbn._API, "planted": __name__}
    globals()["planted"] = _no_sections
    try:
        assert api_problems(api, LATER) == [
            "planted: no Args: section for x, scale", "planted: returns float but has no Returns: section",
            "planted: raises but has no Raises: section"]
        assert api_problems(api, LATER | {__name__}) == []
    finally:
        del globals()["planted"]
