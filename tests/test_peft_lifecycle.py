"""PEFT's adapter lifecycle with LongLoRA adapters, as PEFT documents it.

Position interpolation and S2-Attn change the base model all adapters share, which PEFT's own lifecycle (unload,
delete_adapter, disable_adapter, add_adapter) knows nothing about. These are the behaviours PEFT promises, on
inputs of 48 tokens (PEFT's own 3-token test inputs cannot show a RoPE change), each checked against the base model
as it was before `get_peft_model`. PEFT's own test harness runs in tests/external/test_peft_common_tester.py.
"""

from __future__ import annotations

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model

from longlora_hf import LongLoraConfig, load_plain_lora, save_as_plain_lora
from support.helpers import tiny_model, trained


ARCHS = ["llama", "qwen2", "llama3-rope", "gemma3-interleaved"]
CONTEXT = 64  # the tiny bases' context; the adapters extend it to 128 (or 256)


def base_model(arch, seed=0):
    return tiny_model(arch, seed=seed, max_position_embeddings=CONTEXT)


def ids(n=48, rows=2):
    return torch.randint(4, 128, (rows, n), generator=torch.Generator().manual_seed(5))


def logits(model, inputs=None):
    model.eval()
    with torch.no_grad():
        return model(ids() if inputs is None else inputs).logits


def base_facts(model):
    config = model.config.get_text_config()
    return (
        model.config._attn_implementation,
        config.rope_parameters,
        config.max_position_embeddings,
        hasattr(model.config, "s2_attention") or hasattr(config, "s2_attention"),
    )


def longlora(arch, target=2 * CONTEXT, seed=0, **config):
    """(the base's facts and logits before, a trained LongLoRA PeftModel over it)."""
    base = base_model(arch, seed=seed)
    facts, expected = base_facts(base), logits(base)
    model = trained(get_peft_model(base, LongLoraConfig(target_context_length=target, **config)))
    return facts, expected, model


@pytest.mark.parametrize("arch", ARCHS)
def test_unload_gives_back_the_base_model(arch):
    facts, expected, model = longlora(arch)
    assert base_facts(model.get_base_model()) != facts  # the adapter did change the shared base
    base = model.unload()
    assert base_facts(base) == facts
    torch.testing.assert_close(logits(base), expected, atol=0, rtol=0)
    base.train()
    assert base.config._attn_implementation != "s2"  # it no longer trains with S2


@pytest.mark.parametrize("arch", ARCHS)
def test_deleting_every_adapter_gives_back_the_base_model(arch):
    facts, expected, model = longlora(arch)
    model.add_adapter("second", LongLoraConfig(target_context_length=2 * CONTEXT))
    model.delete_adapter("default")
    assert base_facts(model.get_base_model()) != facts  # the remaining adapter still runs the extension
    model.delete_adapter("second")
    assert base_facts(model.base_model.model) == facts  # (get_base_model needs an active adapter)
    torch.testing.assert_close(logits(model.base_model.model), expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_runs_the_base_model_and_gives_the_adapter_back_on_exit(arch):
    facts, expected, model = longlora(arch)
    adapted, rope = logits(model), model.get_base_model().config.get_text_config().rope_parameters
    with model.disable_adapter():
        assert base_facts(model.get_base_model()) == facts
        torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)
    assert model.get_base_model().config.get_text_config().rope_parameters == rope
    torch.testing.assert_close(logits(model), adapted, atol=0, rtol=0)


def test_add_adapter_with_another_extension_is_refused_and_the_first_adapter_is_untouched():
    _, _, model = longlora("llama")
    before, rope = logits(model), model.get_base_model().config.rope_parameters
    with pytest.raises(ValueError, match=r"other LongLoRA adapters run it extended to linear \(factor 2.*same target"):
        model.add_adapter("other", LongLoraConfig(target_context_length=4 * CONTEXT))
    assert "other" not in model.peft_config
    assert model.get_base_model().config.rope_parameters == rope
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_second_adapter_of_the_same_extension_loads_on_its_base_every_way(arch, tmp_path):
    _, _, model = longlora(arch)
    base_dir = tmp_path / "base"
    base_model(arch).save_pretrained(base_dir)
    model.add_adapter("second", LongLoraConfig(target_context_length=2 * CONTEXT))
    model.set_adapter("second")
    trained(model)
    model.peft_config["second"].base_model_name_or_path = str(base_dir)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapters")
    second = tmp_path / "adapters" / "second"
    for loaded in (
        PeftModel.from_pretrained(base_model(arch), second),
        AutoPeftModelForCausalLM.from_pretrained(second),
    ):
        torch.testing.assert_close(logits(loaded), expected, atol=0, rtol=0)


def test_a_config_used_by_add_adapter_works_again_on_a_fresh_base():
    _, _, model = longlora("llama")
    config = LongLoraConfig(target_context_length=2 * CONTEXT)
    model.add_adapter("second", config)
    again = get_peft_model(base_model("llama"), config)
    assert again.get_base_model().config.rope_parameters == model.get_base_model().config.rope_parameters


def test_each_adapter_trains_with_its_own_attention_settings():
    _, _, model = longlora("llama", group_size=4)
    model.add_adapter("dense", LongLoraConfig(target_context_length=2 * CONTEXT, use_s2_attn=False))
    assert model.get_base_model().config._attn_implementation == "s2"  # adding an adapter does not activate it
    model.set_adapter("dense")
    assert model.get_base_model().config._attn_implementation == "sdpa"
    model.set_adapter("default")
    config = model.get_base_model().config
    assert (config._attn_implementation, config.s2_attention["group_size"]) == ("s2", 4)


def test_add_weighted_adapter_is_refused_with_lora_plus_modules_naming_the_way_round():
    _, _, model = longlora("llama")
    model.add_adapter("second", LongLoraConfig(target_context_length=2 * CONTEXT))
    with pytest.raises(
        ValueError, match=r"combines LoRA factors only.*trainable_embeddings=False and trainable_norms"
    ):
        model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "mix", combination_type="linear")


@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_add_weighted_adapter_without_lora_plus_combines_as_for_plain_lora(combination_type):
    """The control: PEFT's own LoRA with the same weights, combined by PEFT the same way."""
    plain = dict(trainable_embeddings=False, trainable_norms=False)
    _, _, model = longlora("llama", **plain)
    model.add_adapter("second", LongLoraConfig(target_context_length=2 * CONTEXT, **plain))
    model.set_adapter("second")
    trained(model)
    model.add_weighted_adapter(["default", "second"], [0.7, 0.3], "mix", combination_type=combination_type)
    model.set_adapter("mix")
    target_modules = sorted(model.peft_config["default"].target_modules)
    lora = dict(target_modules=target_modules, r=8, lora_alpha=16)  # LongLoRA's defaults, the paper's
    control = get_peft_model(base_model("llama"), LoraConfig(**lora))
    control.add_adapter("second", LoraConfig(**lora))
    control.base_model.model.load_state_dict(model.get_base_model().state_dict(), strict=False)
    control.add_weighted_adapter(["default", "second"], [0.7, 0.3], "mix", combination_type=combination_type)
    control.set_adapter("mix")
    weights = {n: p for n, p in model.named_parameters() if ".mix." in n}
    control_weights = {n: p for n, p in control.named_parameters() if ".mix." in n}
    assert weights.keys() == control_weights.keys() and weights
    for name, weight in weights.items():
        torch.testing.assert_close(weight, control_weights[name], atol=0, rtol=0)


def test_a_mixed_adapter_batch_with_trained_norms_is_refused_naming_the_way_round():
    _, _, model = longlora("llama")
    model.add_adapter("second", LongLoraConfig(target_context_length=2 * CONTEXT))
    model.eval()
    with pytest.raises(ValueError, match=r"mixes adapters.*trainable_norms=True.*model.set_adapter\(name\)"):
        model(ids(), adapter_names=["default", "second"])


def test_a_mixed_adapter_batch_without_trained_norms_gives_each_row_its_adapters_output():
    _, _, model = longlora("llama", trainable_norms=False)
    model.add_adapter("second", LongLoraConfig(target_context_length=2 * CONTEXT, trainable_norms=False))
    model.set_adapter("second")
    trained(model)
    inputs = ids()
    rows = []
    for row, name in enumerate(["default", "second"]):
        model.set_adapter(name)
        rows.append(logits(model, inputs)[row])
    with torch.no_grad():
        mixed = model(inputs, adapter_names=["default", "second"]).logits
    torch.testing.assert_close(mixed, torch.stack(rows), atol=1e-6, rtol=0)


def test_a_plain_lora_adapter_loads_next_to_a_longlora_adapter_and_computes_what_peft_computes(tmp_path):
    lora = trained(
        get_peft_model(
            base_model("llama", seed=3), LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])
        )
    )
    expected = logits(lora)
    lora.save_pretrained(tmp_path / "lora")
    model = trained(get_peft_model(base_model("llama", seed=3), LongLoraConfig()))
    own = logits(model)
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):  # PEFT's own refusal
        model.load_adapter(tmp_path / "lora", "plain")
    load_plain_lora(model, tmp_path / "lora", "plain")
    assert model.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".plain." in n)  # loaded for inference
    torch.testing.assert_close(logits(model), own, atol=0, rtol=0)
    model.set_adapter("plain")
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)


def test_a_plain_lora_export_loads_next_to_its_longlora_twin_with_the_twins_logits(tmp_path):
    _, _, model = longlora("llama")
    expected = logits(model)
    save_as_plain_lora(model, tmp_path / "export")
    load_plain_lora(model, tmp_path / "export", "export")
    model.set_adapter("export")
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)


def test_load_plain_lora_refuses_an_adapter_that_is_not_plain_lora(tmp_path):
    _, _, model = longlora("llama")
    model.save_pretrained(tmp_path / "longlora")
    with pytest.raises(ValueError, match=r"loads LoRA adapters; this one is LONGLORA\. Use model.load_adapter"):
        load_plain_lora(model, tmp_path / "longlora", "again")


def test_a_second_adapter_of_a_tied_model_trains_an_output_head_tied_to_its_embedding():
    """PEFT finds no tie once a first adapter wraps the embedding: the second adapter's head would stay the base's."""
    _, _, model = longlora("gemma3-interleaved")  # Gemma 3 ties its output head to its input embedding
    model.add_adapter("second", LongLoraConfig(target_context_length=2 * CONTEXT))
    model.set_adapter("second")
    base = model.get_base_model()
    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    assert head.modules_to_save["second"].weight is embedding.modules_to_save["second"].weight
