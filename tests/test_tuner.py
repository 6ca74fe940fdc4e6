"""`LongLoraConfig`: a PEFT tuner for LoRA+ with S2-Attn and position interpolation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields

import pytest
import torch
import transformers
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn

from longlora_hf import LongLoraConfig, save_as_plain_lora
from longlora_hf.attention import S2AttentionSettings
from longlora_hf.tuner import is_input_embedding, is_normalization
from support.helpers import shadow_longlora_hf, tiny_model, trained


ROUND_TRIP_ARCHS = ["llama", "qwen2", "gpt-neox", "phi3", "qwen3", "llama-tied"]


def make_base(arch, seed=0):
    if arch == "llama-tied":
        return tiny_model("llama", seed=seed, tie_word_embeddings=True)
    return tiny_model(arch, seed=seed)


def ids(n=40):
    return torch.randint(4, 128, (2, n), generator=torch.Generator().manual_seed(2))


def save_base_and_adapter(arch, tmp_path, **config):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_base(arch).save_pretrained(base_dir)
    model = trained(get_peft_model(make_base(arch), LongLoraConfig(target_context_length=1024, **config)))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    model.eval()
    return model, base_dir, adapter_dir


def test_defaults_are_the_papers():
    config = LongLoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 16, 0.0, "none")
    assert config.task_type == "CAUSAL_LM"
    assert (config.group_size_ratio, config.group_size, config.use_s2_attn) == (0.25, None, True)
    assert config.trainable_embeddings and config.trainable_norms
    assert config.target_context_length is None and config.rope_type is None  # None: extend the model's own scheme
    assert (config.shift, config.inner_attn_implementation) == (
        True,
        None,
    )  # None: the attention the model was loaded with
    assert isinstance(config, LoraConfig) and config.peft_type == "LONGLORA"


def test_every_longlora_field_is_documented():
    own = [f for f in fields(LongLoraConfig) if f.name not in {g.name for g in fields(LoraConfig)}]
    assert own and all(len(f.metadata.get("help", "")) > 20 for f in own), [f.name for f in own]


@pytest.mark.parametrize("arch", ROUND_TRIP_ARCHS)
def test_exactly_lora_embeddings_and_norms_train(arch):
    base = make_base(arch)
    norms = {name for name, m in base.named_modules() if is_normalization(m)}
    embedding = next(name for name, m in base.named_modules() if m is base.get_input_embeddings())
    model = get_peft_model(base, LongLoraConfig())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lora = {name for name in trainable if ".lora_A." in name or ".lora_B." in name}
    saved = {name.split(".modules_to_save.")[0].removeprefix("base_model.model.") for name in trainable - lora}
    assert saved == norms | {embedding}
    assert all(".modules_to_save.default." in name for name in trainable - lora)
    assert norms and all(any(k in name for k in ("attn", "attention")) for name in lora)


@pytest.mark.parametrize("arch", ROUND_TRIP_ARCHS)
def test_auto_peft_model_reloads_with_the_same_logits_interpolation_and_dense_attention(arch, tmp_path):
    model, _, adapter_dir = save_base_and_adapter(arch, tmp_path)
    expected = model(ids()).logits
    assert isinstance(PeftConfig.from_pretrained(adapter_dir), LongLoraConfig)
    reloaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    base_config = reloaded.get_base_model().config
    assert base_config.rope_parameters["rope_type"] == "linear" and base_config.rope_parameters["factor"] == 4.0
    assert base_config.max_position_embeddings == 1024
    assert base_config._attn_implementation == "sdpa"
    torch.testing.assert_close(reloaded(ids()).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
def test_peft_model_from_pretrained_and_load_adapter_round_trip(arch, tmp_path):
    model, _, adapter_dir = save_base_and_adapter(arch, tmp_path)
    expected = model(ids()).logits
    reloaded = PeftModel.from_pretrained(make_base(arch), adapter_dir)
    torch.testing.assert_close(reloaded(ids()).logits, expected, atol=1e-6, rtol=0)

    other = get_peft_model(make_base(arch), LongLoraConfig(target_context_length=1024), adapter_name="other")
    other.load_adapter(adapter_dir, adapter_name="loaded")
    other.set_adapter("loaded")
    other.eval()
    torch.testing.assert_close(other(ids()).logits, expected, atol=1e-6, rtol=0)


def test_tied_embeddings_stay_tied_through_training():
    model = get_peft_model(make_base("llama-tied"), LongLoraConfig())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids(), labels=ids()).loss.backward()
    optimizer.step()
    base = model.get_base_model()
    assert torch.equal(base.get_input_embeddings().weight, base.get_output_embeddings().weight)
    assert base.get_input_embeddings().weight.requires_grad


@pytest.mark.parametrize(
    "max_positions,existing_factor,target,expected_step,expected_max_positions",
    [
        (256, None, 1024, 4.0, 1024),
        (256, None, 1000, 4.0, 1024),
        (256, None, 257, 2.0, 512),
        (256, None, 256, 1.0, 256),
        (256, 2.0, 2048, 4.0, 2048),  # a linear x2 model handles 512 tokens: x4 more, factor 8 in all
        (256, 2.0, 512, 1.0, 256),
    ],
)
def test_position_interpolation_factor_is_ceil_target_over_current_context(
    max_positions, existing_factor, target, expected_step, expected_max_positions
):
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if existing_factor:
        rope = {"rope_type": "linear", "factor": existing_factor, "rope_theta": 10000.0}
    base = tiny_model("llama", max_position_embeddings=max_positions, rope_parameters=rope)
    model = get_peft_model(base, LongLoraConfig(target_context_length=target, use_s2_attn=False))
    config = model.peft_config["default"]
    assert config.position_interpolation_factor == expected_step
    assert config.original_context_length == max_positions * (existing_factor or 1)
    assert base.config.rope_parameters.get("factor", 1.0) == expected_step * (existing_factor or 1)
    assert base.config.max_position_embeddings == expected_max_positions


def test_interpolated_model_equals_one_built_with_that_rope_scaling():
    """Independent path: transformers builds the scaled rotary embedding from the config at init."""
    model = get_peft_model(tiny_model("llama"), LongLoraConfig(target_context_length=1024)).eval()
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    scaled_from_start = tiny_model("llama", rope_parameters=rope, max_position_embeddings=1024)
    torch.testing.assert_close(model(ids()).logits, scaled_from_start(ids()).logits, atol=1e-6, rtol=0)
    assert not torch.allclose(tiny_model("llama")(ids()).logits, scaled_from_start(ids()).logits)


@pytest.mark.parametrize(
    "rope_type,expected,max_positions",
    [
        (
            "yarn",
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0},
            1024,
        ),
        # dynamic NTK reads max_position_embeddings as its unscaled length: it stays
        ("dynamic", {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, 256),
    ],
)
def test_other_rope_extensions_can_be_chosen_on_plain_rope(rope_type, expected, max_positions):
    base = tiny_model("llama")
    get_peft_model(base, LongLoraConfig(target_context_length=1024, rope_type=rope_type, use_s2_attn=False))
    assert base.config.rope_parameters == expected and base.config.max_position_embeddings == max_positions
    reference = tiny_model("llama", rope_parameters=expected, max_position_embeddings=max_positions)
    long_ids = torch.randint(4, 128, (1, 600), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(base(long_ids).logits, reference(long_ids).logits, atol=1e-6, rtol=0)


def test_get_peft_model_switches_to_s2_with_the_configured_group_size():
    base = tiny_model("llama")
    get_peft_model(base, LongLoraConfig(group_size=16))
    assert base.config._attn_implementation == "s2"
    assert S2AttentionSettings.from_config(base.config) == S2AttentionSettings(group_size=16)


def eager(model):
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize(
    "attach",
    [
        lambda base, adapter_dir: get_peft_model(base, LongLoraConfig(use_s2_attn=False)),
        lambda base, adapter_dir: PeftModel.from_pretrained(base, adapter_dir),  # loaded for inference
        lambda base, adapter_dir: get_peft_model(base, LongLoraConfig(use_s2_attn=False)).load_adapter(
            adapter_dir, "loaded"
        ),
    ],
    ids=["get_peft_model-use_s2_attn-false", "from_pretrained", "load_adapter"],
)
def test_where_s2_does_not_train_the_models_attention_is_left_alone(attach, tmp_path):
    # "eager" is an attention S2 never picks (its inner kernel is sdpa, or flash-attn for a flash model), so
    # it survives only if nothing switched the attention, there and back.
    _, _, adapter_dir = save_base_and_adapter("llama", tmp_path)  # trained with S2
    base = eager(make_base("llama"))
    attach(base, adapter_dir)
    assert base.config._attn_implementation == "eager"


def run_without_longlora_hf(tmp_path, script):
    env = {**os.environ, "PYTHONPATH": shadow_longlora_hf(tmp_path), "HF_HUB_OFFLINE": "1"}
    prelude = (
        "try:\n    import longlora_hf\n    raise SystemExit('longlora_hf must not be importable')\n"
        "except ImportError:\n    pass\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_merged_model_loads_in_plain_transformers_with_the_same_logits(arch, tmp_path):
    model, _, _ = save_base_and_adapter(arch, tmp_path)
    expected = model(ids()).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert saved["rope_parameters"]["factor"] == 4.0 and "s2_attention" not in saved
    torch.save({"ids": ids(), "expected": expected}, tmp_path / "check.pt")
    run_without_longlora_hf(
        tmp_path,
        f"""
        import torch, transformers
        check = torch.load({str(tmp_path / "check.pt")!r}, weights_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r})
        assert model.config._attn_implementation == "sdpa"
        assert model.config.rope_parameters["rope_type"] == "linear"
        torch.testing.assert_close(model(check["ids"]).logits, check["expected"], atol=1e-5, rtol=0)
        """,
    )


@pytest.mark.parametrize("arch", ["llama", "gpt-neox", "llama-tied"])
def test_plain_lora_export_loads_in_vanilla_peft_with_the_same_logits(arch, tmp_path):
    model, base_dir, _ = save_base_and_adapter(arch, tmp_path)
    expected = model(ids()).logits
    export = save_as_plain_lora(model, tmp_path / "plain")
    adapter_config = json.loads((export / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and "target_context_length" not in adapter_config
    assert set(adapter_config["modules_to_save"]) >= {"input_layernorm", "post_attention_layernorm"}
    torch.save({"ids": ids(), "expected": expected}, tmp_path / "check.pt")
    run_without_longlora_hf(
        tmp_path,
        f"""
        import torch, transformers
        from peft import PeftModel, PeftConfig, LoraConfig
        check = torch.load({str(tmp_path / "check.pt")!r}, weights_only=True)
        config = transformers.AutoConfig.from_pretrained({str(export)!r})
        base = transformers.AutoModelForCausalLM.from_pretrained({str(base_dir)!r}, config=config)
        assert type(PeftConfig.from_pretrained({str(export)!r})) is LoraConfig
        model = PeftModel.from_pretrained(base, {str(export)!r}).eval()
        torch.testing.assert_close(model(check["ids"]).logits, check["expected"], atol=1e-5, rtol=0)
        """,
    )


def test_llama2_7b_trainable_parameters_match_the_paper():
    """Paper Section 3.3: embeddings are < 2% of the parameters, normalization layers <= 0.004%."""
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(config)
    total = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, LongLoraConfig(use_s2_attn=False))
    trainable, _ = model.get_nb_trainable_parameters()
    embeddings = 32000 * 4096
    norms = (2 * 32 + 1) * 4096
    lora = 32 * 4 * 8 * (4096 + 4096)
    assert trainable == lora + embeddings + norms
    assert embeddings / total < 0.02 and norms / total <= 0.00004
    assert 6.7e9 < total < 6.8e9


def test_training_works_with_gradient_checkpointing_and_bf16():
    model = get_peft_model(tiny_model("llama").to(torch.bfloat16), LongLoraConfig(target_context_length=512))
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss = model(ids(64), labels=ids(64)).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("value", [0, -5, 1.5, "32k", True])
def test_target_context_length_must_be_a_positive_integer(value):
    with pytest.raises(
        ValueError, match=rf"target_context_length must be a positive integer number of tokens; got {value!r}"
    ):
        LongLoraConfig(target_context_length=value)


@pytest.mark.parametrize(
    "make,targets",
    [
        (
            lambda: transformers.GPT2LMHeadModel(
                transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0)
            ),
            ["c_attn"],
        ),
        (
            lambda: transformers.BloomForCausalLM(
                transformers.BloomConfig(vocab_size=128, hidden_size=32, n_layer=1, n_head=4)
            ),
            None,
        ),
    ],
    ids=["learned-positions", "alibi"],
)
def test_interpolating_a_model_without_rope_is_refused_and_changes_nothing(make, targets):
    model = make()
    config_before = model.config.to_dict()
    with pytest.raises(ValueError, match="has no rotary position embeddings.*learned absolute positions or ALiBi"):
        get_peft_model(model, LongLoraConfig(target_context_length=1024, use_s2_attn=False, target_modules=targets))
    assert model.config.to_dict() == config_before and not hasattr(model, "peft_config")


def test_an_architecture_without_findable_attention_projections_lists_what_was_found():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn.__class__ = type("TokenMixer", (type(layer.self_attn),), {})
    with pytest.raises(
        ValueError, match=r"Found no attention projections.*linear layers: \[.*'q_proj'.*\].*target_modules"
    ):
        get_peft_model(model, LongLoraConfig(use_s2_attn=False))


@pytest.mark.parametrize("first", [LoraConfig, LongLoraConfig], ids=["lora", "longlora"])
def test_get_peft_model_on_a_peft_model_says_it_already_is_one(first):
    model = get_peft_model(
        tiny_model("llama"), first(target_modules=["q_proj"]) if first is LoraConfig else first(use_s2_attn=False)
    )
    with pytest.raises(
        ValueError, match=r"already a PEFT model \(\w*PeftModel\w* with adapters \['default'\]\).*get_base_model"
    ):
        get_peft_model(model, LongLoraConfig())


def test_gpt2s_conv1d_attention_is_named_in_the_no_projections_error():
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4, n_positions=256)
    with pytest.raises(ValueError, match=r"GPT2Attention \(holds Conv1D, Dropout\).*target_modules"):
        get_peft_model(transformers.GPT2LMHeadModel(config), LongLoraConfig(use_s2_attn=False))


def test_s2_on_a_model_that_does_not_dispatch_through_the_registry_is_refused_before_any_change():
    config = transformers.BloomConfig(vocab_size=128, hidden_size=32, n_layer=1, n_head=4)  # ALiBi: no RoPE to extend
    model = transformers.BloomForCausalLM(config)
    before = model.config.to_dict()
    with pytest.raises(ValueError, match="BloomForCausalLM does not dispatch attention through"):
        get_peft_model(model, LongLoraConfig(use_s2_attn=True, target_context_length=None))
    assert model.config.to_dict() == before and model.config._attn_implementation != "s2"


def test_is_normalization_finds_norms_by_type():
    assert is_normalization(nn.LayerNorm(4)) and is_normalization(nn.RMSNorm(4))
    assert is_normalization(transformers.models.llama.modeling_llama.LlamaRMSNorm(4))
    assert not is_normalization(nn.Linear(4, 4))


def test_a_module_peft_wraps_is_still_what_it_wraps():
    model = get_peft_model(make_base("llama"), LongLoraConfig(use_s2_attn=False))
    decoder = model.get_base_model().model
    assert type(decoder.embed_tokens).__name__ == type(decoder.norm).__name__ == "ModulesToSaveWrapper"
    assert is_input_embedding(model, decoder.embed_tokens) and is_normalization(decoder.norm)
    assert not is_input_embedding(model, decoder.norm) and not is_normalization(decoder.embed_tokens)


def test_an_adapter_of_a_base_loaded_from_a_relative_directory_loads_from_anywhere(tmp_path, monkeypatch):
    """`model_name_or_path: longlora_hf/demo/assets` in a recipe: the adapter records where the base really is."""
    (tmp_path / "work").mkdir()
    tiny_model("llama").save_pretrained(tmp_path / "work" / "base")
    monkeypatch.chdir(tmp_path / "work")
    model = get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained("base"), LongLoraConfig(use_s2_attn=False)
    )
    model.save_pretrained(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)  # elsewhere: "base" means nothing here
    recorded = PeftConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path
    assert recorded == str(tmp_path / "work" / "base")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    ids = torch.randint(4, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)
