"""The public surface is what the docs say: the error tree drawn in `errors.py`'s docstring,
each package's `__all__`, the leaf modules' `__all__`, and the README's Layout section."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

import bastion
from bastion import errors

README = Path(__file__).resolve().parents[1] / "README.md"
LEAVES = ("errors", "types", "asgi", "ids", "rpc", "sse", "wire")
# The config package re-exports its sections' names; each section exports what it defines.
CONFIG_SECTIONS = tuple(
    f"config.{name}"
    for name in "base gateway auth upstreams policy audit operators settings loader".split()
)


@functools.cache
def all_modules() -> dict[str, ModuleType]:
    """Every module of the package, imported, so that every class it defines exists."""
    found = {"bastion": bastion}
    for info in pkgutil.walk_packages(bastion.__path__, "bastion."):
        found[info.name] = importlib.import_module(info.name)
    return found


def packages() -> list[str]:
    return sorted(name for name, module in all_modules().items() if hasattr(module, "__path__"))


def submodules(package: ModuleType) -> set[str]:
    """The public modules and subpackages directly inside `package`."""
    return {
        info.name
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_")
    }


# -- the error tree ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One class as the docstring draws it."""

    name: str
    parent: str | None
    code: str
    http_status: int
    rpc_code: int


_ROW = re.compile(
    r"(?P<prefix>(?:[│ ]   )*(?:[├└]── )?)(?P<name>\w+)\s+(?P<code>[a-z_.]+)\s+"
    r"(?P<http>\d{3})\s+(?P<rpc>-\d+)(?:\s+\(.+\))?"
)


def drawn_tree() -> list[Row]:
    """The rows of the tree in `errors.__doc__`, each with its parent from the indentation."""
    doc = errors.__doc__ or ""
    block = doc.split("```")[1].strip("\n").splitlines()
    assert block[0].split() == ["class", "code", "HTTP", "JSON-RPC"]
    rows: list[Row] = []
    ancestors: list[str] = []
    for line in block[1:]:
        match = _ROW.fullmatch(line.rstrip())
        assert match, f"cannot read this line of the error tree: {line!r}"
        depth = len(match["prefix"]) // 4
        assert depth <= len(ancestors), f"{match['name']} is drawn deeper than its parent"
        del ancestors[depth:]
        parent = ancestors[-1] if ancestors else None
        rows.append(
            Row(match["name"], parent, match["code"], int(match["http"]), int(match["rpc"]))
        )
        ancestors.append(match["name"])
    return rows


def defined_errors() -> dict[str, type[errors.BastionError]]:
    """Every subclass of BastionError, however deep, in every module of the package."""
    all_modules()
    found: dict[str, type[errors.BastionError]] = {}
    todo: list[type[errors.BastionError]] = [errors.BastionError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("bastion"):
            found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def test_the_docstring_draws_exactly_the_error_classes_with_their_parents_and_wire_form() -> None:
    rows = drawn_tree()
    classes = defined_errors()
    assert [row.name for row in rows].count("BastionError") == 1
    assert len({row.name for row in rows}) == len(rows), "a class is drawn twice"
    assert {row.name for row in rows} == set(classes)
    for row in rows:
        cls = classes[row.name]
        bases = [base for base in cls.__bases__ if issubclass(base, errors.BastionError)]
        parent = bases[0].__name__ if bases else None
        assert (row.parent, row.code, row.http_status, row.rpc_code) == (
            parent,
            cls.code,
            cls.http_status,
            cls.rpc_code,
        ), f"{row.name} is drawn differently from its definition"


def test_every_error_class_lives_in_errors_py() -> None:
    for name, cls in defined_errors().items():
        assert cls.__module__ == "bastion.errors", f"{name} is defined in {cls.__module__}"
    for module_name, module in all_modules().items():
        for name, obj in vars(module).items():
            if not (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            if obj.__module__ != module_name or module_name == "bastion.errors":
                continue
            # Only control flow private to one module may stay there, named as private.
            assert name.startswith("_"), f"{module_name}.{name} belongs in bastion/errors.py"


def test_errors_all_is_the_drawn_tree_and_its_helpers() -> None:
    classes = {name for name in errors.__all__ if inspect.isclass(getattr(errors, name))}
    assert classes == {row.name for row in drawn_tree()}
    assert set(errors.__all__) - classes == {"SHOWN_LIMIT", "shown"}


def test_each_error_docstring_is_present() -> None:
    for name, cls in defined_errors().items():
        assert (cls.__doc__ or "").strip(), f"{name} has no docstring"


# -- the leaf modules --------------------------------------------------------------------------


def defined_public_names(module: ModuleType) -> set[str]:
    """Names a module defines at its top level (classes, functions, assignments), not imports,
    and not underscore-named."""
    tree = ast.parse(Path(module.__file__ or "").read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


@pytest.mark.parametrize("leaf", LEAVES + CONFIG_SECTIONS)
def test_a_leaf_module_exports_exactly_what_it_defines(leaf: str) -> None:
    module = importlib.import_module(f"bastion.{leaf}")
    exported = list(module.__all__)
    assert len(set(exported)) == len(exported), f"bastion.{leaf}.__all__ repeats a name"
    for name in exported:
        assert hasattr(module, name), f"bastion.{leaf}.__all__ names {name}, which is not there"
    assert set(exported) == defined_public_names(module)


def test_asgi_types_are_defined_once() -> None:
    asgi = importlib.import_module("bastion.asgi")
    for module_name, module in all_modules().items():
        if module_name != "bastion.asgi":
            again = defined_public_names(module) & set(asgi.__all__)
            assert not again, f"{module_name} defines {again}; import them from bastion.asgi"


# -- the packages ------------------------------------------------------------------------------


def lists_modules(package: ModuleType) -> bool:
    """Whether the package offers its modules (as most do) rather than re-exported names."""
    return set(package.__all__) <= submodules(package)


@pytest.mark.parametrize("name", packages())
def test_a_package_has_a_docstring_and_an_all_that_resolves(name: str) -> None:
    package = all_modules()[name]
    assert (package.__doc__ or "").strip(), f"{name} has no docstring"
    exported = list(package.__all__)
    assert exported, f"{name}.__all__ is empty"
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
    if lists_modules(package):
        modules = submodules(package)
        assert set(exported) == modules, (
            f"{name}.__all__ should name its modules: add {sorted(modules - set(exported))}, "
            f"drop {sorted(set(exported) - modules)}"
        )
        return
    for member in exported:
        obj = getattr(package, member, None)
        assert obj is not None, f"{name}.__all__ names {member}, which is not there"
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.startswith("bastion."), f"{name}.{member} is not Bastion's"


# -- the README's Layout section -----------------------------------------------------------------


def readme_layout() -> dict[str, set[str]]:
    """Package name -> the modules and subpackages the README's Layout section names in it."""
    text = README.read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1].splitlines()
    named: dict[str, set[str]] = {"bastion": set()}
    described: dict[str, str] = {}  # package -> what its entry says, continuation lines joined
    parents = {2: "bastion"}
    current = "bastion"
    for line in block:
        entry = re.fullmatch(r"( {2,8})(\S+(?: \S+)*?)(?: {2,}(.*))?", line)
        if entry is None:
            described[current] = described.get(current, "") + " " + line.strip()
            continue
        parent = parents[len(entry[1])]
        current = parent
        for item in entry[2].split():
            named[parent].add(item.removesuffix(".py").removesuffix("/"))
            if item.endswith("/"):
                current = f"{parent}.{item[:-1]}"
                named.setdefault(current, set())
                parents[len(entry[1]) + 2] = current
        described[current] = described.get(current, "") + " " + (entry[3] or "")
    for package, description in described.items():
        if package != "bastion":
            named[package].update(re.findall(r"\b(\w+)\.py\b", description))
    return named


def test_the_readme_layout_names_real_modules_that_each_package_offers() -> None:
    layout = readme_layout()
    assert {"errors", "types", "config", "pipeline", "control"} <= layout["bastion"]
    leaves = submodules(bastion)
    for name, modules in layout.items():
        package = all_modules().get(name)
        assert package is not None, f"the README's Layout names {name}: no such package"
        # A package's entry may also mention a top-level module it uses (`over wire.py`).
        unknown = modules - submodules(package) - (leaves if name != "bastion" else set())
        assert not unknown, f"the README's Layout names {unknown} in {name}: no such module"
        if lists_modules(package):
            missing = (modules & submodules(package)) - set(package.__all__)
            assert not missing, f"{name}.__all__ lacks {missing}, which the README names"


def test_every_package_appears_in_the_readme_layout() -> None:
    layout = readme_layout()
    for name in packages():
        parent, _, last = name.rpartition(".")
        if parent:
            assert last in layout.get(parent, set()), f"the README's Layout omits {name}"
