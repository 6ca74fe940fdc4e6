"""The repository's policy checks: rules on the package's source that no test of its behaviour would catch.

    python utils/check_repo.py [--root DIR] [CHECK ...]

Run by `make quality` after ruff. Each check is a function below whose docstring says the rule and why; it
returns its violations as `path:line: what` lines. The script prints every violation under its check's name
(on stdout) and exits 1 if there was any (0 otherwise). A check that crashes counts as failed, with its traceback.

`--root` (default: this repository) is the directory holding the `longlora_hf/` to check; the package is
imported from there, so a copy of the repository can be checked. Naming checks runs only those.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPOSITORY = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------- the package


@dataclass(frozen=True)
class Package:
    """The package under check: its directory and, by module name, every module's source file."""

    root: Path  # the directory holding longlora_hf/
    path: Path  # root / "longlora_hf"
    modules: dict[str, Path]

    def where(self, path: Path, line: int = 1) -> str:
        path = Path(path)
        return f"{path.relative_to(self.root) if path.is_relative_to(self.root) else path}:{line}"


def load_package(root: Path) -> Package:
    """Import `longlora_hf` from `root` and list its modules. The templates' package is installed from the
    top-level model_cards/ directory (pyproject's package-dir), so it is found where Python finds it."""
    sys.path.insert(0, str(root))
    import longlora_hf

    path = Path(longlora_hf.__file__).resolve().parent
    if path != (root / "longlora_hf").resolve():
        sys.exit(f"check_repo: `import longlora_hf` found {path}, not the package under {root}")
    modules = {}
    for source in sorted(path.rglob("*.py")):
        parts = source.relative_to(path.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = source
    modules["longlora_hf.model_cards"] = Path(importlib.util.find_spec("longlora_hf.model_cards").origin)
    return Package(root=root.resolve(), path=path, modules=modules)


def calls(path: Path):
    """Every call in a source file, with the callee as written (`torch.load`, `pickle.loads`...)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def sources(package: Package) -> list[Path]:
    return sorted(package.path.rglob("*.py"))


# ---------------------------------------------------------------------------------------------------- safe loading


def check_the_checks_see_the_package(package: Package) -> list[str]:
    """The source checks below read `longlora_hf/**/*.py`: there must be a package there, one that loads with
    `torch.load`, or they would pass on nothing."""
    found = sources(package)
    if len(found) > 20 and any(name == "torch.load" for path in found for _, name in calls(path)):
        return []
    return [f"{package.where(package.path)}: {len(found)} source files and no torch.load: not the package"]


def check_every_torch_load_is_weights_only(package: Package) -> list[str]:
    """Every `torch.load` passes `weights_only=True`, written as the constant: unpickling anything else runs
    whatever code the file holds (checkpoints converted from the reference code are `.bin` pickles)."""
    return [
        f"{package.where(path, node.lineno)}: {ast.unparse(node)} (weights_only=True missing)"
        for path in sources(package)
        for node, name in calls(path)
        if name == "torch.load" and not is_true(keyword(node, "weights_only"))
    ]


def check_no_trust_remote_code_and_no_pickle(package: Package) -> list[str]:
    """No call turns on `trust_remote_code=True`, and nothing calls `pickle.load`, `pickle.loads` or
    `pickle.Unpickler`: both run code from a downloaded file or repository."""
    found = []
    for path in sources(package):
        for node, name in calls(path):
            if is_true(keyword(node, "trust_remote_code")):
                found.append(f"{package.where(path, node.lineno)}: {ast.unparse(node)} (turns on trust_remote_code)")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                found.append(f"{package.where(path, node.lineno)}: {ast.unparse(node)} (calls pickle)")
    return found


# ---------------------------------------------------------------------------------------------------- the commands

EXPECTED_COMMANDS = {"example", "demo", "sft", "format", "merge", "convert-reference", "convert-gguf", "eval"}
"""The commands of `longlora-hf`. A new command is added here, to its module's `register` and to `cli.COMMANDS`."""

STATED_TIME = re.compile(r"~\s*\d|\b\d+(\.\d+)?\s*(min|mins|minutes|minute|s|sec|seconds)\b|about a minute")


def registered_commands() -> tuple[dict[str, tuple[object, argparse.ArgumentParser]], list[str]]:
    """command name -> (the registry module that added it, its parser); and the commands registered twice."""
    from longlora_hf import cli

    commands, twice = {}, []
    for module in cli.COMMANDS:
        subparsers = argparse.ArgumentParser().add_subparsers()
        module.register(subparsers)
        for name, parser in subparsers.choices.items():
            if name in commands:
                twice.append(name)
            commands[name] = (module, parser)
    return commands, twice


def where_defined(package: Package, obj) -> str:
    """path:line of a module, function or class."""
    try:
        return package.where(inspect.getsourcefile(obj), inspect.getsourcelines(obj)[1] or 1)
    except (TypeError, OSError):
        return f"<{getattr(obj, '__name__', obj)}>:1"


def where_written(package: Package, text: str, modules) -> str | None:
    """path:line of the first source line of `modules` that holds `text`."""
    for module in modules:
        path = inspect.getsourcefile(module)
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if text in line:
                return package.where(path, number)
    return None


def check_every_command_comes_from_the_registry_with_its_run_function_beside_its_parser(package: Package) -> list[str]:
    """`longlora-hf` has exactly the commands of `EXPECTED_COMMANDS`, each added once by a module of
    `cli.COMMANDS`, and each command's `run` function lives in the module that builds its parser: a command's
    code, arguments and entry point are read in one place, and the CLI module stays a registry."""
    from longlora_hf import cli

    registry = where_written(package, "COMMANDS = ", [cli]) or where_defined(package, cli)
    found = []
    commands, twice = registered_commands()
    found += [f"{registry}: {name} registered twice" for name in twice]
    if set(commands) != EXPECTED_COMMANDS:
        found.append(
            f"{registry}: the registry's commands are {sorted(commands)}, not {sorted(EXPECTED_COMMANDS)} "
            "(EXPECTED_COMMANDS in utils/check_repo.py)"
        )
    top_level = set(cli.make_parser()._subparsers._group_actions[0].choices)
    if top_level != EXPECTED_COMMANDS:
        found.append(f"{registry}: `longlora-hf --help` lists {sorted(top_level)}, not {sorted(EXPECTED_COMMANDS)}")
    for name, (module, parser) in commands.items():
        run = parser.get_default("run")
        if not callable(run):
            found.append(f"{where_defined(package, module.register)}: {name} sets no run function")
        elif run.__module__ != module.__name__:
            found.append(
                f"{where_defined(package, module.register)}: {name}: parser in {module.__name__}, "
                f"run in {run.__module__}"
            )
    return found


def check_no_help_or_docstring_states_a_time(package: Package) -> list[str]:
    """No command's `--help`, the top-level `--help` (each command's one-line help) or a command module's
    docstring states a time ("~5", "30 s", "2 minutes", "about a minute"): times are measured and stated in
    the documentation, where they are dated; a figure in a help text or a docstring goes stale. (`sft --help`
    is TRL's.)"""
    from longlora_hf import cli

    commands, _ = registered_commands()
    texts = {  # where -> (text, the modules it comes from, where it is when the figure cannot be found there)
        f"{name} --help": (parser.format_help(), [module], where_defined(package, module.register))
        for name, (module, parser) in commands.items()
        if name != "sft"
    }
    texts["--help"] = (cli.make_parser().format_help(), [cli, *cli.COMMANDS], where_defined(package, cli.make_parser))
    texts.update(
        {module.__name__: (module.__doc__ or "", [module], where_defined(package, module)) for module in cli.COMMANDS}
    )
    found = []
    for name, (text, modules, fallback) in texts.items():
        match = STATED_TIME.search(text)
        if match:
            found.append(
                f"{where_written(package, match.group(), modules) or fallback}: {name} states {match.group()!r}"
            )
    return found


# ---------------------------------------------------------------------------------------------------- the layering

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
    ("demo", "sft", "example", "real_model"),  # end-to-end programs
    ("cli",),
    ("longlora_hf",),  # the package __init__: registration, the public names
)
"""The package's units, lowest layer first. A unit is a top-level module or subpackage of `longlora_hf`
(`tuner`, `hub`, `model_card`...); the package `__init__` is the unit `longlora_hf`. A unit may import its own
layer's units (without cycles) and those of the layers below."""
LAYER = {unit: index for index, units in enumerate(LAYERS) for unit in units}


@dataclass(frozen=True)
class Import:
    importer: str
    path: Path
    line: int
    imported: str


def unit_of(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def imports_of(package: Package, module: str, path: Path) -> list[Import]:
    """The package modules `module` imports, at any depth of its source (functions included): an import
    deferred into a function still ties the two units together, and hiding a cycle there is what the layering
    checks exist to stop."""
    parent = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = importlib.util.resolve_name("." * node.level + (node.module or ""), parent)
            # `from . import metrics` imports the module longlora_hf.metrics; `from .x import name`, the module x
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in package.modules else source
                for alias in node.names
            ]
        else:
            continue
        found += [
            Import(module, path, node.lineno, target) for target in targets if target.split(".")[0] == "longlora_hf"
        ]
    return found


def package_imports(package: Package) -> list[Import]:
    return [found for module, path in package.modules.items() for found in imports_of(package, module, path)]


def describe(package: Package, found: Import) -> str:
    return f"{package.where(found.path, found.line)}: {found.importer} imports {found.imported}"


def check_every_import_of_the_package_names_a_module_that_exists(package: Package) -> list[str]:
    """Every import of a `longlora_hf` module names one that exists (the layering is read from the names)."""
    return [
        f"{describe(package, found)}, which does not exist"
        for found in package_imports(package)
        if found.imported not in package.modules
    ]


def check_every_unit_has_a_layer(package: Package) -> list[str]:
    """Every unit of the package is placed in `LAYERS`: a new module or subpackage says where it stands."""
    first_module = {}
    for module, path in package.modules.items():
        first_module.setdefault(unit_of(module), path)
    return [
        f"{package.where(path)}: unit {unit!r} has no layer in LAYERS (utils/check_repo.py)"
        for unit, path in sorted(first_module.items())
        if unit not in LAYER
    ]


def check_no_module_imports_a_unit_above_its_own_layer(package: Package) -> list[str]:
    """No module imports a unit of a higher layer (`LAYERS`): the low layers (position interpolation, the "s2"
    backend, the tuner) stay usable without the training, Hub and command code built on them."""
    return [
        f"{describe(package, found)}: unit {unit_of(found.imported)!r} (layer {LAYER[unit_of(found.imported)]}) is "
        f"above {unit_of(found.importer)!r} (layer {LAYER[unit_of(found.importer)]})"
        for found in package_imports(package)  # a unit without a layer is check_every_unit_has_a_layer's to report
        if LAYER.get(unit_of(found.imported), -1) > LAYER.get(unit_of(found.importer), len(LAYERS))
    ]


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


def cycle_violations(package: Package, edges: dict[str, dict[str, Import]], kind: str) -> list[str]:
    cycle = first_cycle(edges)
    if cycle is None:
        return []
    return [
        f"{describe(package, edges[a][b])} (import cycle of {kind} {' -> '.join(cycle)})"
        for a, b in zip(cycle, cycle[1:])
    ]


def check_the_units_import_each_other_without_cycles(package: Package) -> list[str]:
    """The units import each other without cycles. Importing any module of a unit runs the unit's `__init__`
    first, so a cycle of units is a cycle of imports, whichever modules it goes through."""
    edges: dict[str, dict[str, Import]] = {}
    for found in package_imports(package):
        importer, imported = unit_of(found.importer), unit_of(found.imported)
        if importer != imported:
            edges.setdefault(importer, {}).setdefault(imported, found)
    return cycle_violations(package, edges, "units")


def check_the_modules_import_each_other_without_cycles(package: Package) -> list[str]:
    """The modules import each other without cycles, inside a unit too. A module importing a package that
    contains it (its own package's `__init__`, which has run before it) is no cycle: Python runs a package's
    `__init__` before any of its modules."""
    edges: dict[str, dict[str, Import]] = {}
    for found in package_imports(package):
        if not found.importer.startswith(found.imported + ".") and found.importer != found.imported:
            edges.setdefault(found.importer, {}).setdefault(found.imported, found)
    return cycle_violations(package, edges, "modules")


# One process, not one per module (each would spend seconds importing torch): the third-party packages the
# package imports at module level are imported once, then a forked child per module imports it in a state
# where no longlora_hf module has been imported yet, as in a fresh interpreter.
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


def third_party_module_level_imports(package: Package) -> set[str]:
    """The top-level packages the package imports outside functions (torch, transformers, peft...)."""
    names = set()
    for path in package.modules.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module.split(".")[0])
    return names - {"longlora_hf", "__future__"}


def check_every_module_imports_on_its_own_in_a_fresh_interpreter(package: Package) -> list[str]:
    """Every module imports on its own, first, in an interpreter where no other `longlora_hf` module has been
    imported: an import that works only because another module happened to be imported first (a hidden cycle
    or a missing import) breaks `python -m longlora_hf.x` and users who import one module."""
    if not hasattr(os, "fork"):
        print("check_every_module_imports_on_its_own_in_a_fresh_interpreter: skipped (imports each module in a fork)")
        return []
    pythonpath = os.pathsep.join([str(package.root), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(IMPORT_EACH),
            " ".join(package.modules),
            " ".join(sorted(third_party_module_level_imports(package))),
        ],
        cwd=package.root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode == 0:
        return []
    failed = result.stdout.rpartition("failed:")[2].split()
    details = textwrap.indent((result.stdout[-2000:] + result.stderr[:8000]).rstrip(), "    ")  # the first in full
    if not failed:
        return [f"{package.where(package.path / '__init__.py')}: the import check itself failed:\n{details}"]
    lines = [
        f"{package.where(package.modules.get(name, package.path))}: import {name} fails on its own" for name in failed
    ]
    return lines[:-1] + [f"{lines[-1]}\n{details}"]


# ---------------------------------------------------------------------------------------------------- the script

CHECKS: list[Callable[[Package], list[str]]] = [
    check_the_checks_see_the_package,
    check_every_torch_load_is_weights_only,
    check_no_trust_remote_code_and_no_pickle,
    check_every_import_of_the_package_names_a_module_that_exists,
    check_every_unit_has_a_layer,
    check_no_module_imports_a_unit_above_its_own_layer,
    check_the_units_import_each_other_without_cycles,
    check_the_modules_import_each_other_without_cycles,
    check_every_module_imports_on_its_own_in_a_fresh_interpreter,
    check_every_command_comes_from_the_registry_with_its_run_function_beside_its_parser,
    check_no_help_or_docstring_states_a_time,
]


def main(argv: list[str] | None = None) -> int:
    names = [check.__name__ for check in CHECKS]
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--root", type=Path, default=REPOSITORY, help="the directory holding longlora_hf/")
    parser.add_argument("checks", nargs="*", metavar="CHECK", help=f"only these: {', '.join(names)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.checks) - set(names))
    if unknown:
        parser.error(f"unknown checks: {', '.join(unknown)}")
    package = load_package(args.root.resolve())
    failed = 0
    for check in CHECKS:
        if args.checks and check.__name__ not in args.checks:
            continue
        try:
            violations = check(package)
        except Exception:
            violations = [f"the check raised:\n{textwrap.indent(traceback.format_exc().rstrip(), '    ')}"]
        violations = list(dict.fromkeys(violations))  # `from .x import a, b` is one import of x
        if violations:
            failed += 1
            print(f"{check.__name__}: {len(violations)} violation(s)")
            for violation in violations:
                print(f"  {violation}")
    ran = len(args.checks) or len(CHECKS)
    print(f"check_repo: {ran - failed} of {ran} checks passed" + ("" if not failed else f", {failed} failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
