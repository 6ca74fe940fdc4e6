"""The package never advises loading a file that holds code. (That it never unpickles without `weights_only=True`,
turns on `trust_remote_code` or calls pickle directly is checked on its source by `make quality`:
utils/check_repo.py. That tokens never reach output, files or the Hub is checked where they are used:
tests/test_hub_push_pull.py.)"""

from __future__ import annotations

import os

import pytest


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
