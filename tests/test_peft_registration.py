"""Registration with PEFT: `import longlora_hf` makes "LONGLORA" a `PeftType` like PEFT's own and maps it to
`LongLoraConfig` and its tuner, once, so configs copy and pickle, and saved adapters load in a new process.

PEFT's `PeftType` enum cannot take new members through any API, so `longlora_hf/tuner/__init__.py` adds
one to the enum's tables (`_add_peft_type`); these are the behaviours that depend on it.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import longlora_hf
from longlora_hf import LongLoraConfig
from longlora_hf.tuner import LongLoraModel
from support.helpers import tiny_model, trained


@pytest.mark.parametrize(
    "lookup",
    [
        lambda: PeftType("LONGLORA"),
        lambda: PeftType["LONGLORA"],
        lambda: PeftType.__members__["LONGLORA"],
        lambda: next(member for member in PeftType if member.value == "LONGLORA"),
        lambda: LongLoraConfig().peft_type,
    ],
    ids=["by-value", "by-name", "members", "iteration", "config"],
)
def test_longlora_is_one_peft_type_member_found_every_way_peft_finds_its_own(lookup):
    member = lookup()
    assert member is PeftType.LONGLORA
    assert isinstance(member, PeftType) and member == "LONGLORA" and member.name == member.value == "LONGLORA"


def test_peft_maps_the_type_to_the_longlora_config_and_tuner():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LONGLORA] is LongLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LONGLORA] is LongLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.LONGLORA] == "lora_"  # LoRA's weights, LoRA's names


def test_registering_again_changes_nothing():
    def state():
        mappings = (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING)
        return list(PeftType), dict(PeftType.__members__), [dict(mapping) for mapping in mappings]

    before, member = state(), PeftType.LONGLORA
    longlora_hf.register()
    longlora_hf.register()
    assert state() == before and PeftType.LONGLORA is member


@pytest.mark.parametrize(
    "round_trip", [lambda c: pickle.loads(pickle.dumps(c)), copy.deepcopy], ids=["pickle", "deepcopy"]
)
def test_a_config_survives_pickling_and_deep_copying(round_trip):
    # as get_peft_model leaves it: resolved target modules (a set), LoRA+ modules, the recorded RoPE (dicts)
    config = get_peft_model(tiny_model("llama"), LongLoraConfig(target_context_length=1024)).peft_config["default"]
    copied = round_trip(config)
    assert copied == config and copied is not config
    assert type(copied) is LongLoraConfig and copied.peft_type is PeftType.LONGLORA


def test_a_saved_adapter_loads_in_a_new_process_after_import_longlora_hf_alone(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("llama").save_pretrained(base_dir)
    model = trained(get_peft_model(tiny_model("llama"), LongLoraConfig(target_context_length=1024)))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    ids = torch.randint(4, 128, (1, 600), generator=torch.Generator().manual_seed(2))  # beyond the base's 256
    with torch.no_grad():
        torch.save({"ids": ids, "expected": model.eval()(ids).logits}, tmp_path / "check.pt")
    script = f"""
        import torch
        from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel  # PEFT first: the order does not matter
        from transformers import AutoModelForCausalLM

        import longlora_hf  # the only thing a user adds

        assert type(PeftConfig.from_pretrained({str(adapter_dir)!r})).__name__ == "LongLoraConfig"
        check = torch.load({str(tmp_path / "check.pt")!r}, weights_only=True)
        auto = AutoPeftModelForCausalLM.from_pretrained({str(adapter_dir)!r})
        explicit = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), {str(adapter_dir)!r}
        )
        for loaded in (auto, explicit):
            with torch.no_grad():
                torch.testing.assert_close(loaded(check["ids"]).logits, check["expected"], atol=1e-5, rtol=0)
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
