"""One definition of the S2-Attn settings, shared by the backend, `LongLoraConfig` and `longlora-hf sft`, and
an inner kernel that follows the attention the model was loaded with."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from longlora_hf import LongLoraConfig
from longlora_hf.attention import S2AttentionSettings, s2
from longlora_hf.training.arguments import (
    CONFIG_FLAGS,
    LongLoraArguments,
    SftArguments,
    longlora_config,
    make_parser,
)
from support.helpers import tiny_model
from support.s2_reference import masked_attention, s2_reference_mask, varlen_stand_in


def test_every_s2_setting_is_a_field_of_the_config_and_a_flag_of_sft_with_the_backends_help():
    config_fields = {f.name: f for f in fields(LongLoraConfig)}
    flag_fields = {f.name: f for f in fields(LongLoraArguments)}
    for setting in fields(S2AttentionSettings):
        assert config_fields[setting.name].metadata["help"].endswith(setting.metadata["help"]), setting.name
        assert flag_fields[setting.name].metadata["help"] == config_fields[setting.name].metadata["help"], setting.name
        assert flag_fields[setting.name].default == config_fields[setting.name].default, setting.name


def test_every_longlora_flag_of_sft_has_the_type_of_its_config_field():
    import typing

    flags, config = typing.get_type_hints(LongLoraArguments), typing.get_type_hints(LongLoraConfig)
    assert len(CONFIG_FLAGS) == 10
    for name in CONFIG_FLAGS:
        assert flags[name] == config[name], name


def test_sft_flags_reach_the_config():
    parser = make_parser()
    args = [
        "--output_dir",
        "out",
        "--model_name_or_path",
        "m",
        "--max_length",
        "4096",
        "--use_cpu",
        "--bf16",
        "false",
        "--group_size",
        "64",
        "--no_shift",
        "--inner_attn_implementation",
        "flash_attention_2",
        "--rope_type",
        "yarn",
        "--lora_r",
        "4",
        "--mlp_tile_size",
        "2048",
    ]
    config = longlora_config(SftArguments(*parser.parse_args_and_config(args=args, fail_with_unknown_args=True)))
    assert (config.group_size, config.shift, config.inner_attn_implementation) == (64, False, "flash_attention_2")
    assert (config.rope_type, config.r, config.target_context_length) == ("yarn", 4, 4096)
    assert config.mlp_tile_size == 2048


def with_loaded_attention(model, implementation):
    # What `from_pretrained(..., attn_implementation=implementation)` records; flash-attn itself cannot load on a CPU.
    model.config._attn_implementation = implementation
    return model


@pytest.mark.parametrize(
    "loaded,inner", [("sdpa", "sdpa"), ("eager", "sdpa"), ("flash_attention_2", "flash_attention_2")]
)
def test_the_inner_kernel_defaults_to_the_attention_the_model_was_loaded_with(loaded, inner):
    model = with_loaded_attention(tiny_model("llama"), loaded)
    get_peft_model(model, LongLoraConfig())
    assert model.config._attn_implementation == "s2"
    assert S2AttentionSettings.from_config(model.config).inner_attn_implementation == inner


def test_an_explicit_inner_kernel_wins_over_the_loaded_one():
    model = with_loaded_attention(tiny_model("llama"), "flash_attention_2")
    get_peft_model(model, LongLoraConfig(inner_attn_implementation="sdpa", shift=False, group_size=8))
    assert S2AttentionSettings.from_config(model.config) == S2AttentionSettings(
        group_size=8, shift=False, inner_attn_implementation="sdpa"
    )


def test_a_model_loaded_with_flash_attention_2_trains_through_the_varlen_path(monkeypatch):
    calls = []
    monkeypatch.setattr(s2, "_load_flash_varlen", lambda: varlen_stand_in(calls))
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 17:] = 0

    reference = tiny_model("llama").double().train()

    def reference_attention(module, query, key, value, mask, scaling=None, **kwargs):
        return masked_attention(
            query, key, value, s2_reference_mask(attention_mask.bool(), query.shape[1]), scaling
        ), None

    AttentionInterface.register("s2_reference_partition", reference_attention)
    AttentionMaskInterface.register("s2_reference_partition", sdpa_mask)
    reference.set_attn_implementation("s2_reference_partition")
    expected = reference(ids, attention_mask=attention_mask).logits

    model = get_peft_model(
        with_loaded_attention(tiny_model("llama").double(), "flash_attention_2"), LongLoraConfig(lora_dropout=0.0)
    )
    model.train()
    logits = model(ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-10, rtol=0)  # LoRA B starts at 0: same function
    assert len(calls) == 2 * model.config.num_hidden_layers  # two halves per layer, all through flash's varlen kernel
    logits[real].logsumexp(-1).mean().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


RECIPES = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "trainer_configs" / "recipes").glob("*.yaml"))


def test_the_recipes_are_found_from_any_directory():
    assert len(RECIPES) >= 9 and any(recipe.endswith("tiny_cpu.yaml") for recipe in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_parses_into_a_longlora_config_with_its_s2_settings(recipe):
    import yaml

    keys = yaml.safe_load(open(recipe))
    parsed = make_parser().parse_args_and_config(
        args=["--config", recipe, "--use_cpu", "--bf16", "false"], fail_with_unknown_args=True
    )
    config = longlora_config(SftArguments(*parsed))
    for name in ("group_size_ratio", "shift", "inner_attn_implementation", "mlp_tile_size"):
        assert getattr(config, name) == keys.get(name, getattr(LongLoraConfig(), name)), name
