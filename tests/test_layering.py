"""The package's layering: every module imports only its own unit or units of lower layers, the units
import each other without cycles, and every module imports on its own.

A unit is a top-level module or subpackage of `longlora_hf` (`tuner`, `hub`, `model_card`...); the package
`__init__` is the unit `longlora_hf`. Imports are read from the source (ast), those inside functions too:
an import deferred into a function still ties the two units together, and hiding a cycle there is what
this test exists to stop.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import longlora_hf


# Lowest first. A unit may import its own layer's units (without cycles) and those of the layers below.
LAYERS = (
    (
        "position_interpolation",
        "model_cards",
        "model_card",
        "paths",
        "flags",
    ),  # leaves: torch, huggingface_hub, the templates; paths: what commands read and write
    ("attention",),  # the "s2" backend
    ("tuner",),  # LongLoraConfig: position interpolation + S2 + the card it writes on save
    ("training", "hub", "metrics"),  # built on the tuner; metrics' eval command reads training's records
    ("demo", "sft", "example"),  # end-to-end programs
    ("cli",),
    ("longlora_hf",),  # the package __init__: registration, the public names
)
LAYER = {unit: index for index, units in enumerate(LAYERS) for unit in units}
PACKAGE = Path(longlora_hf.__file__).parent


@dataclass(frozen=True)
class Import:
    importer: str
    path: Path
    line: int
    imported: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(PACKAGE.parent)}:{self.line} ({self.importer}) imports {self.imported}"


def package_modules() -> dict[str, Path]:
    """Every module of the package, name -> source file. The templates' package is installed from the
    top-level model_cards/ directory (pyproject's package-dir), so it is found where Python finds it."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    modules["longlora_hf.model_cards"] = Path(importlib.util.find_spec("longlora_hf.model_cards").origin)
    return modules


MODULES = package_modules()


def unit_of(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def imports_of(module: str, path: Path) -> list[Import]:
    """The package modules `module` imports, at any depth of its source (functions included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            # `from . import metrics` imports the module longlora_hf.metrics; `from .x import name`, the module x
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in node.names
            ]
        else:
            continue
        found += [
            Import(module, path, node.lineno, target) for target in targets if target.split(".")[0] == "longlora_hf"
        ]
    return found


IMPORTS = [found for module, path in MODULES.items() for found in imports_of(module, path)]


def test_every_import_of_the_package_names_a_module_that_exists():
    missing = [str(found) for found in IMPORTS if found.imported not in MODULES]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_every_unit_has_a_layer():
    units = {unit_of(module) for module in MODULES}
    assert units <= LAYER.keys(), f"units without a layer in LAYERS: {sorted(units - LAYER.keys())}"


def test_no_module_imports_a_unit_above_its_own_layer():
    upward = [
        f"{found}: unit {unit_of(found.imported)!r} (layer {LAYER[unit_of(found.imported)]}) is above "
        f"{unit_of(found.importer)!r} (layer {LAYER[unit_of(found.importer)]})"
        for found in IMPORTS  # a unit without a layer is test_every_unit_has_a_layer's to report
        if LAYER.get(unit_of(found.imported), -1) > LAYER.get(unit_of(found.importer), len(LAYERS))
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def first_cycle(edges: dict[str, dict[str, Import]]) -> list[str] | None:
    """A cycle of the graph `edges` (node -> {imported node: the import}) as its nodes, the first one closing it."""

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        for imported in edges.get(node, {}):
            cycle = cycle_from(imported, path + [node])
            if cycle:
                return cycle
        return None

    for node in sorted(edges):
        cycle = cycle_from(node, [])
        if cycle:
            return cycle
    return None


def assert_no_cycle(edges: dict[str, dict[str, Import]], kind: str) -> None:
    cycle = first_cycle(edges)
    assert cycle is None, f"import cycle of {kind} {' -> '.join(cycle)}:\n" + "\n".join(
        str(edges[a][b]) for a, b in zip(cycle, cycle[1:])
    )


def test_the_units_import_each_other_without_cycles():
    # Importing any module of a unit runs the unit's __init__ first, so a cycle of units is a cycle of imports.
    edges: dict[str, dict[str, Import]] = {}
    for found in IMPORTS:
        importer, imported = unit_of(found.importer), unit_of(found.imported)
        if importer != imported:
            edges.setdefault(importer, {}).setdefault(imported, found)
    assert_no_cycle(edges, "units")


def test_the_modules_import_each_other_without_cycles():
    """Inside a unit too. A module importing a package that contains it (its own package's __init__, which
    has run before it) is no cycle: Python runs a package's __init__ before any of its modules."""
    edges: dict[str, dict[str, Import]] = {}
    for found in IMPORTS:
        if not found.importer.startswith(found.imported + ".") and found.importer != found.imported:
            edges.setdefault(found.importer, {}).setdefault(found.imported, found)
    assert_no_cycle(edges, "modules")


# One process, not one per module (each would spend seconds importing torch): the third-party packages
# the package imports at module level are imported once, then a forked child per module imports it in
# a state where no longlora_hf module has been imported yet, as in a fresh interpreter.
IMPORT_EACH = """
import importlib, os, sys, traceback

for name in sys.argv[2].split():
    importlib.import_module(name)
assert not any(name.split(".")[0] == "longlora_hf" for name in sys.modules)
failed = []
for name in sys.argv[1].split():
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            print(f"--- import {name} failed:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
print("failed:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def third_party_module_level_imports() -> set[str]:
    """The top-level packages the package imports outside functions (torch, transformers, peft...)."""
    names = set()
    for path in MODULES.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module.split(".")[0])
    return names - {"longlora_hf", "__future__"}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="imports each module in a forked child")
def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(IMPORT_EACH),
            " ".join(MODULES),
            " ".join(sorted(third_party_module_level_imports())),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[:8000]  # the first failure in full
