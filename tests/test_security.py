"""What the package never does, checked on its source: unpickle without `weights_only=True`, turn on
`trust_remote_code`, or call pickle directly; and never advises loading a file that holds code. (That tokens
never reach output, files or the Hub is checked where they are used: tests/test_hub_push_pull.py.)"""

from __future__ import annotations

import ast
import os
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
            assert isinstance(value, ast.Constant) and value.value is True, (
                f"{path}:{node.lineno}: {ast.unparse(node)}"
            )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_trust_remote_code_is_never_turned_on_and_pickle_is_never_called(path):
    for node, name in calls(path):
        value = keyword(node, "trust_remote_code")
        assert not (isinstance(value, ast.Constant) and value.value is True), (
            f"{path}:{node.lineno}: {ast.unparse(node)}"
        )
        assert name not in ("pickle.load", "pickle.loads", "pickle.Unpickler"), (
            f"{path}:{node.lineno}: {ast.unparse(node)}"
        )


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload", [Payload(), "module"], ids=["a function call", "a class"])
def test_a_pickle_holding_code_is_refused_without_torchs_advice_to_load_it_anyway(tmp_path, payload):
    """torch's refusal says re-running with `weights_only=False` "will likely succeed": that runs the code. The
    message says the file holds code and was not loaded, and how to get a copy of tensors only."""
    import torch

    from longlora_hf.hub.convert import _load_pickle_state_dict

    path = tmp_path / "trainable_params.bin"
    torch.save({"model.norm.weight": torch.nn.Linear(2, 2) if payload == "module" else payload}, path)
    with pytest.raises(ValueError) as refused:
        _load_pickle_state_dict(path)
    message = str(refused.value)
    for advice in ("weights_only", "will likely succeed", "add_safe_globals", "safe_globals"):
        assert advice not in message, message
    called = "torch.nn.modules.linear.Linear" if payload == "module" else f"{os.system.__module__}.system"
    assert f"{path} holds code, not only tensors (unpickling it would call {called}), so it was not loaded" in message
    assert "torch.save({name: tensor, ...}, 'trainable_params.bin')" in message and "\n" not in message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__  # nor in a traceback
