"""What the package never does, checked on its source: unpickle without `weights_only=True`, turn on
`trust_remote_code`, or call pickle directly. (That tokens never reach output, files or the Hub is checked
where they are used: tests/test_hub_push_pull.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "longlora_hf"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_the_checks_see_the_package():
    assert len(SOURCES) > 20 and any(name == "torch.load" for s in SOURCES for _, name in calls(s))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_torch_load_is_weights_only(path):
    for node, name in calls(path):
        if name == "torch.load":
            value = keyword(node, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{node.lineno}: {ast.unparse(node)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_trust_remote_code_is_never_turned_on_and_pickle_is_never_called(path):
    for node, name in calls(path):
        value = keyword(node, "trust_remote_code")
        assert not (isinstance(value, ast.Constant) and value.value is True), f"{path}:{node.lineno}: {ast.unparse(node)}"
        assert name not in ("pickle.load", "pickle.loads", "pickle.Unpickler"), f"{path}:{node.lineno}: {ast.unparse(node)}"
