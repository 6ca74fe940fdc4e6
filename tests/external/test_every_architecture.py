"""S2-Attn on every decoder-only causal LM of the installed transformers, not on a hand-picked list.

The architectures are enumerated from transformers itself (`architectures.enumerate_architectures`): every model
type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` whose class declares `_supports_attention_backend = True`, less the
multimodal and assistant classes (their config class holds a `text_config`, `vision_config` or `audio_config`;
a text decoder inside, where the mapping has one, is tested under its own model type) and model types that
repeat another's model and config class. Encoders with a causal-LM head (BERT and its kin) stay in the set:
built from their default config (`is_decoder=False`) they are bidirectional, and must be refused.

Each is built tiny from its own default config (`tiny_config`: the sizes shrunk generically, every kind of layer
kept), in float64, and trained one step with LongLoRA (`LongLoraConfig` through `peft.get_peft_model`) on a
padded batch of two rows (32 and 23 tokens: groups of 8 and 5).

"Exact" means all of (`architectures.outcome`):
- in training, S2's logits on the real tokens equal those of an independent reference: the model's own
  `eager_attention_forward` (so its sinks, soft-capping and scaling are its own) under the model's own mask
  intersected with the partition of `tests/support/s2_reference.py`'s `s2_reference_mask`, within 1e-6 of the logits'
  scale; and dense training is far from that reference, so a wrong partition could not pass;
- gradients reach the LoRA factors, the input embedding and the norms, and every trainable tensor that dense
  training reaches;
- in evaluation, S2's logits equal those of its inner backend, sdpa, bit for bit (the model's eager attention,
  within 1e-6, where sdpa refuses the model).
Otherwise longlora_hf must refuse the architecture clearly: a ValueError or TypeError raised in longlora_hf whose
message names one of the reasons of `architectures.REFUSALS`. Anything else is a failure: silently wrong, or an
error that names no reason. Architectures that cannot run tiny are listed, with why, in `CANNOT_RUN_TINY`.

`python tests/support/architectures.py` prints every outcome and the summary for the README.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import longlora_hf
from longlora_hf.attention import check_causal
from support.architectures import (
    CANNOT_RUN,
    CANNOT_RUN_TINY,
    EXACT,
    REFUSALS,
    REFUSED,
    Architecture,
    default_config,
    enumerate_architectures,
    one_thread,
    outcome,
    refusal_reason,
    tiny_model,
    train_plain,
    train_without_s2,
)


ARCHITECTURES, LEFT_OUT = enumerate_architectures()
LEFT_OUT_RULES = (
    r"does not declare _supports_attention_backend",
    r"multimodal or assistant: \w+Config holds (audio|text|vision)_config(, (audio|text|vision)_config)*",
    r"same model class and config class as [\w-]+",
)


def test_every_causal_lm_model_type_of_transformers_is_tested_or_left_out_by_a_stated_rule():
    assert set(ARCHITECTURES) | set(LEFT_OUT) == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert not set(ARCHITECTURES) & set(LEFT_OUT)
    for model_type, rule in LEFT_OUT.items():
        assert any(re.fullmatch(pattern, rule) for pattern in LEFT_OUT_RULES), (model_type, rule)
    assert all(arch.model_class._supports_attention_backend for arch in ARCHITECTURES.values())
    assert set(CANNOT_RUN_TINY) <= set(ARCHITECTURES)
    assert len(ARCHITECTURES) >= 100  # transformers 5.24 has 125: an enumeration that lost most of them is broken


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_the_tiny_model_keeps_every_kind_of_module_of_the_default_size_one(model_type):
    """Shrinking must not drop a kind of layer (an attention layer of a hybrid, the MoE layers after dense ones):
    what S2 is checked on is the architecture, at another width. The default-size model is built on the meta
    device, so it costs no memory."""
    arch = ARCHITECTURES[model_type]
    if model_type in CANNOT_RUN_TINY:
        pytest.skip(f"listed in CANNOT_RUN_TINY: {CANNOT_RUN_TINY[model_type]}")
    with one_thread(), torch.device("meta"):
        default_kinds = {type(module).__name__ for module in arch.model_class(default_config(arch)).modules()}
    with one_thread():
        tiny_kinds = {type(module).__name__ for module in tiny_model(arch).modules()}
    assert default_kinds <= tiny_kinds, f"the tiny {model_type} lacks {sorted(default_kinds - tiny_kinds)}"


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_s2_trains_the_architecture_exactly_or_refuses_it_naming_the_reason(model_type):
    result = outcome(ARCHITECTURES[model_type])
    if model_type in CANNOT_RUN_TINY:
        assert result.status == CANNOT_RUN and re.search(CANNOT_RUN_TINY[model_type], result.reason), (
            f"{model_type} is listed in CANNOT_RUN_TINY but now gives: {result}. Remove it from the list."
        )
        pytest.skip(f"cannot run tiny: {result.reason}")
    assert result.status in (EXACT, REFUSED), f"{model_type}: {result}"
    if result.status == REFUSED:
        assert result.reason in REFUSALS
        if result.reason != "no attention projections for LoRA":  # its advice is target_modules, not dense attention
            assert "use_s2_attn=False" in result.message, result.message
            try:
                grad = train_without_s2(ARCHITECTURES[model_type])  # following the advice trains the model
            except Exception as error:  # noqa: BLE001 - blamed on the advice unless the model fails without LongLoRA
                with pytest.raises(type(error)):
                    train_plain(ARCHITECTURES[model_type])
            else:
                assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# Models that do not declare `_supports_attention_backend` but whose attention modules look their function up in
# ALL_ATTENTION_FUNCTIONS, which longlora_hf accepts (`dispatches_through_the_registry`): the hybrids and older
# classes users train. Not enumerated: many undeclared classes are encoder-decoder halves that cannot train tiny.
UNDECLARED_BUT_DISPATCHING = (
    "biogpt",
    "falcon",
    "falcon_h1",
    "jamba",
    "nemotron_h",
    "qwen3_next",
    "stablelm",
    "zamba2",
)


@pytest.mark.parametrize("model_type", UNDECLARED_BUT_DISPATCHING)
def test_an_accepted_model_that_declares_no_backend_support_trains_exactly_or_is_refused(model_type):
    assert LEFT_OUT[model_type] == "does not declare _supports_attention_backend"
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    result = outcome(Architecture(model_type, model_class, CONFIG_MAPPING[model_type]))
    assert result.status in (EXACT, REFUSED), f"{model_type}: {result}"
    if result.status == REFUSED:
        assert result.reason in REFUSALS


def test_only_a_longlora_hf_error_naming_a_reason_counts_as_a_refusal():
    """The harness itself: an error raised outside longlora_hf, or one whose message names no known reason, is
    a failure, not a refusal."""
    with pytest.raises(ValueError) as encoder:
        check_causal(False, "BertSelfAttention")
    assert refusal_reason(encoder.value) == "non-causal (an encoder)"
    with pytest.raises(ValueError) as elsewhere:  # the same words, raised outside longlora_hf
        raise ValueError(str(encoder.value))
    assert refusal_reason(elsewhere.value) is None
    with pytest.raises(ValueError) as unnamed:
        longlora_hf.LongLoraConfig(group_size_ratio=2.0)  # raised in longlora_hf, but no reason of REFUSALS
    assert refusal_reason(unnamed.value) is None
