"""Position extension of every RoPE scheme transformers ships, on the RoPE shapes of the models users have.

Each model keeps the real RoPE settings and head size of its namesake (Llama-2, Llama-3.1, Qwen2.5 with
YaRN, Phi-3.5 with LongRoPE, Gemma 3 with RoPE per layer type...) at a tiny width. The expected result
of each extension is written out here by hand, and transformers' own rotary module built from it is the
reference for the cos/sin the extended model computes.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model

from longlora_hf import LongLoraConfig, save_as_plain_lora
from longlora_hf.tuner import plan_position_interpolation
from support.helpers import tiny_model, trained


TINY = dict(vocab_size=128, intermediate_size=64, num_hidden_layers=1, pad_token_id=1, bos_token_id=2, eos_token_id=3)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1000000.0}
# Phi-3.5-mini's LongRoPE shape: 48 rescale factors per set (head size 96), short ones near 1, long ones growing.
SHORT = [1.0 + 0.002 * i for i in range(48)]
LONG = [1.0 + 0.06 * i**1.5 for i in range(48)]
LONGROPE = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "rope_theta": 10000.0}
GEMMA3 = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
}


def llama2(rope=None, max_positions=4096):  # Llama-2-7B: head size 128, theta 10000, 4096 tokens
    rope = rope or {"rope_type": "default", "rope_theta": 10000.0}
    return transformers.LlamaConfig(
        **TINY,
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rope_parameters=rope,
    )


def llama31(rope=None, max_positions=131072):  # Llama-3.1-8B: head size 128, llama3 x8 over 8192
    return transformers.LlamaConfig(
        **TINY,
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        rope_parameters=dict(rope or LLAMA3),
    )


def qwen25_yarn(rope=None, max_positions=32768):  # Qwen2.5-7B-Instruct with its documented YaRN x4 over 32768
    return transformers.Qwen2Config(
        **TINY,
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rope_parameters=dict(rope or YARN),
    )


def phi35_longrope(rope=None, max_positions=131072):  # Phi-3.5-mini: head size 96, 4096 original, 131072 now
    return transformers.Phi3Config(
        **TINY,
        hidden_size=192,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        original_max_position_embeddings=4096,
        rope_parameters=json.loads(json.dumps(rope or LONGROPE)),
    )


def gemma3(rope=None, max_positions=131072):  # Gemma 3 4B: head size 256, 5 sliding (window 1024) : 1 full layers
    return transformers.Gemma3TextConfig(
        **{**TINY, "num_hidden_layers": 6},
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=max_positions,
        sliding_window=1024,
        rope_parameters=json.loads(json.dumps(rope or GEMMA3)),
    )


GEMMA4 = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}


def gemma4(
    rope=None, max_positions=131072
):  # Gemma 4: proportional RoPE (a quarter of the dims rotate) on full layers
    return transformers.Gemma4TextConfig(
        **{**TINY, "num_hidden_layers": 6},
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=max_positions,
        sliding_window=1024,
        rope_parameters=json.loads(json.dumps(rope or GEMMA4)),
    )


def dynamic(rope=None, max_positions=4096):  # dynamic NTK x2 over a 4096-token model
    return llama2(rope or {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, max_positions)


def linear(
    rope=None, max_positions=4096
):  # a reference LongLoRA merged model: linear x2, max_position_embeddings left at 4096
    return llama2(rope or {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, max_positions)


# name -> (config builder, current context, expected (rope_parameters, max_position_embeddings) after extending by s)
SCHEMES = {
    "llama2-default": (
        llama2,
        4096,
        lambda s: (
            {
                "rope_type": "linear",
                "factor": float(s),
                "original_max_position_embeddings": 4096,
                "rope_theta": 10000.0,
            },
            4096 * s,
        ),
    ),
    "linear": (
        linear,
        8192,
        lambda s: (
            {
                "rope_type": "linear",
                "factor": 2.0 * s,
                "original_max_position_embeddings": 4096,
                "rope_theta": 10000.0,
            },
            8192 * s,
        ),
    ),
    "dynamic": (dynamic, 8192, lambda s: ({"rope_type": "dynamic", "factor": 2.0 * s, "rope_theta": 10000.0}, 4096)),
    "llama3.1": (llama31, 131072, lambda s: ({**LLAMA3, "factor": 8.0 * s}, 131072 * s)),
    "qwen2.5-yarn": (qwen25_yarn, 131072, lambda s: ({**YARN, "factor": 4.0 * s}, 131072 * s)),
    "phi3.5-longrope": (
        phi35_longrope,
        131072,
        lambda s: (
            {
                **LONGROPE,
                "long_factor": [v * s for v in LONG],
                "original_max_position_embeddings": 4096,
                "attention_factor": (1 + torch.tensor(32.0).log().item() / torch.tensor(4096.0).log().item()) ** 0.5,
            },
            131072 * s,
        ),
    ),
    "gemma3": (
        gemma3,
        131072,
        lambda s: ({**GEMMA3, "full_attention": {**GEMMA3["full_attention"], "factor": 8.0 * s}}, 131072 * s),
    ),
    "gemma4-proportional": (
        gemma4,
        131072,
        lambda s: ({**GEMMA4, "full_attention": {**GEMMA4["full_attention"], "factor": float(s)}}, 131072 * s),
    ),
}


def model_of(config, seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def rotary_outputs(model_or_rotary, positions, layer_types=(None,)):
    """cos and sin at `positions` (one sequence), per layer type."""
    rotary = getattr(getattr(model_or_rotary, "model", None), "rotary_emb", model_or_rotary)
    position_ids = torch.tensor([positions])
    x = torch.zeros(1, len(positions), 8)
    return {
        layer: rotary(x, position_ids) if layer is None else rotary(x, position_ids, layer) for layer in layer_types
    }


def layer_types_of(config):
    """The layer types with RoPE of their own (Gemma 3), or [None] for one RoPE for all layers."""
    return [None] if "rope_type" in config.rope_parameters else sorted(config.rope_parameters)


def probe_positions(current, s):
    """Short (within every original context) and long (up to the new context) position sets."""
    return [0, 1, 7, 100, 1000], [0, 5, 3000, current - 1, current * s // 2, current * s - 1]


@pytest.mark.parametrize("s", [2, 4])
@pytest.mark.parametrize("name", SCHEMES)
def test_extending_gives_the_rotary_transformers_builds_from_the_expected_parameters(name, s):
    build, current, expected = SCHEMES[name]
    model = model_of(build())
    config = get_peft_model(model, LongLoraConfig(target_context_length=current * s, use_s2_attn=False)).peft_config[
        "default"
    ]
    rope, max_positions = expected(s)
    reference_config = build(rope, max_positions)
    reference_rotary = type(model.model.rotary_emb)(reference_config)
    assert model.config.max_position_embeddings == max_positions
    assert (config.original_context_length, config.position_interpolation_factor) == (current, float(s))
    layers = layer_types_of(reference_config)
    for positions in probe_positions(current, s):
        got, want = rotary_outputs(model, positions, layers), rotary_outputs(reference_rotary, positions, layers)
        for layer in layers:
            torch.testing.assert_close(got[layer], want[layer], atol=1e-6, rtol=1e-6)


def high_frequency_dims(inv_freq, wavelength_below):
    return (2 * torch.pi / inv_freq) < wavelength_below


@pytest.mark.parametrize("s", [2, 4])
@pytest.mark.parametrize(
    "name,untouched",
    [
        # llama3 leaves dimensions whose wavelength is under original / high_freq_factor unscaled
        ("llama3.1", lambda base: high_frequency_dims(base.inv_freq, 8192 / 4.0)),
        # YaRN extrapolates (leaves alone) dimensions that turn more than beta_fast=32 times in the original context
        ("qwen2.5-yarn", lambda base: (32768 * base.inv_freq / (2 * torch.pi)) > 32),
    ],
)
def test_llama3_and_yarn_keep_the_dimensions_they_leave_untouched(name, untouched, s):
    build, current, _ = SCHEMES[name]
    base = model_of(build())
    before = base.model.rotary_emb
    plain = type(before)(build({"rope_type": "default", "rope_theta": before.config.rope_parameters["rope_theta"]}))
    keep = untouched(plain)
    assert 0 < int(keep.sum()) < keep.numel()
    inv_freq_before, scaling_before = before.inv_freq.clone(), before.attention_scaling
    get_peft_model(base, LongLoraConfig(target_context_length=current * s, use_s2_attn=False))
    after = base.model.rotary_emb
    torch.testing.assert_close(after.inv_freq[keep], inv_freq_before[keep], atol=0, rtol=0)
    assert (after.inv_freq[~keep] < inv_freq_before[~keep]).all()
    # positions below the original context: same angles on those dimensions (cos/sin up to YaRN's attention factor)
    (cos_before, _), (cos_after, _) = (
        rotary_outputs(rotary, list(range(0, 8192, 97)))[None] for rotary in (type(before)(build()), after)
    )
    dims = torch.cat([keep, keep])
    torch.testing.assert_close(
        cos_after[..., dims] / after.attention_scaling, cos_before[..., dims] / scaling_before, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("name", ["phi3.5-longrope", "dynamic"])
def test_longrope_and_dynamic_leave_sequences_within_the_original_context_unchanged(name):
    build, current, _ = SCHEMES[name]
    base = model_of(build())
    short = list(range(0, 4096, 61))
    before = rotary_outputs(base, short)[None]
    get_peft_model(base, LongLoraConfig(target_context_length=current * 4, use_s2_attn=False))
    after = rotary_outputs(base, short)[None]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_longrope_long_sequences_see_at_position_p_times_s_what_p_saw_before():
    build, current, _ = SCHEMES["phi3.5-longrope"]
    base = model_of(build())
    positions = [4100, 9000, 60000, current - 1]
    before = rotary_outputs(base, positions)[None]
    get_peft_model(base, LongLoraConfig(target_context_length=current * 2, use_s2_attn=False))
    after = rotary_outputs(base, [2 * p for p in positions])[None]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_gemma3_sliding_layers_keep_their_rope():
    build, current, _ = SCHEMES["gemma3"]
    base = model_of(build())
    positions = [0, 3, 1023, 50000, current - 1]
    before = rotary_outputs(base, positions, ["sliding_attention", "full_attention"])
    get_peft_model(base, LongLoraConfig(target_context_length=current * 2, use_s2_attn=False))
    after = rotary_outputs(base, positions, ["sliding_attention", "full_attention"])
    for b, a in zip(before["sliding_attention"], after["sliding_attention"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(before["full_attention"][0], after["full_attention"][0])
    assert base.config.layer_types.count("full_attention") == 1


@pytest.mark.parametrize("name", SCHEMES)
def test_a_target_within_the_current_context_changes_nothing_and_is_recorded(name):
    build, current, _ = SCHEMES[name]
    base = model_of(build())
    before = base.config.to_dict()
    config = get_peft_model(base, LongLoraConfig(target_context_length=current // 2, use_s2_attn=False)).peft_config[
        "default"
    ]
    after = base.config.to_dict()
    assert after["rope_parameters"] == before["rope_parameters"]
    assert after["max_position_embeddings"] == before["max_position_embeddings"]
    assert config.position_interpolation_factor == 1.0 and config.original_context_length == current
    assert config.rope_parameters == config.original_rope_parameters == before["rope_parameters"]


@pytest.mark.parametrize(
    "name,rope_type",
    [
        ("llama3.1", "linear"),
        ("qwen2.5-yarn", "linear"),
        ("phi3.5-longrope", "yarn"),
        ("gemma3", "dynamic"),
        ("dynamic", "yarn"),
    ],
)
def test_an_explicit_rope_type_that_would_replace_the_models_scaling_is_refused_before_any_change(name, rope_type):
    build, current, _ = SCHEMES[name]
    base = model_of(build())
    before = base.config.to_dict()
    with pytest.raises(
        ValueError, match=rf"rope_type='{rope_type}' would replace .* own RoPE scaling.*Leave rope_type unset"
    ):
        get_peft_model(base, LongLoraConfig(target_context_length=current * 2, rope_type=rope_type, use_s2_attn=False))
    assert base.config.to_dict() == before


def test_the_models_own_type_named_explicitly_extends_it():
    build, current, expected = SCHEMES["llama3.1"]
    base = model_of(build())
    get_peft_model(base, LongLoraConfig(target_context_length=current * 2, rope_type=None, use_s2_attn=False))
    assert base.config.rope_parameters == expected(2)[0]
    with pytest.raises(ValueError, match="rope_type must be None .* or one of"):
        LongLoraConfig(rope_type="llama3")


def ids():
    return torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", SCHEMES)
def test_the_adapter_records_both_schemes_and_every_way_back_reproduces_the_extension(name, tmp_path):
    build, current, expected = SCHEMES[name]
    model_of(build()).save_pretrained(tmp_path / "base")
    model = trained(get_peft_model(model_of(build()), LongLoraConfig(target_context_length=current * 2)))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    want = model(ids()).logits
    rope, max_positions = expected(2)
    rope = build(rope, max_positions).rope_parameters  # as transformers standardizes it
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["original_rope_parameters"] == build().rope_parameters
    assert saved["rope_parameters"] == rope
    card = (tmp_path / "adapter" / "README.md").read_text()
    original_type = build().rope_parameters.get("rope_type") or "per layer type"
    assert "RoPE of the base model" in card and "x2 over the base model's own scheme" in card
    assert original_type in card or "full_attention" in card

    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    base_config = reloaded.get_base_model().config
    assert (base_config.rope_parameters, base_config.max_position_embeddings) == (rope, max_positions)
    torch.testing.assert_close(reloaded(ids()).logits, want, atol=1e-5, rtol=0)

    reloaded.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (merged.config.rope_parameters, merged.config.max_position_embeddings) == (rope, max_positions)
    # merging adds B @ A into float32 weights: rounding, up to 8e-5 on Gemma 4's 6 layers (a wrong RoPE moves logits
    # by >0.1)
    torch.testing.assert_close(merged(ids()).logits, want, atol=2e-4, rtol=0)

    export = save_as_plain_lora(model, tmp_path / "plain")
    plain_config = transformers.AutoConfig.from_pretrained(export)
    assert (plain_config.rope_parameters, plain_config.max_position_embeddings) == (rope, max_positions)


def test_an_adapter_is_refused_on_a_base_with_other_rope(tmp_path):
    model = get_peft_model(model_of(llama31()), LongLoraConfig(target_context_length=262144))
    model.save_pretrained(tmp_path / "adapter")
    other = model_of(llama31({**LLAMA3, "factor": 4.0}))
    from peft import PeftModel

    with pytest.raises(
        ValueError, match=r"trained over RoPE llama3 \(factor 8.*but the base model has llama3 \(factor 4"
    ):
        PeftModel.from_pretrained(other, tmp_path / "adapter")


@pytest.mark.parametrize(
    "name,target,expected",
    [
        # what longlora_hf 0.1.0 did: linear over max_position_embeddings (or a recorded original) times a linear
        # factor
        (
            "llama2-default",
            16384,
            (
                {
                    "rope_type": "linear",
                    "factor": 4.0,
                    "original_max_position_embeddings": 4096,
                    "rope_theta": 10000.0,
                },
                16384,
            ),
        ),
        # ... and over any other scheme, which it replaced (llama3's keys left in place): Llama-3.1 read as 8192 tokens
        ("llama3.1", 32768, ({**LLAMA3, "rope_type": "linear", "factor": 4.0}, 131072)),
        ("llama3.1", 8192, None),
    ],
)
def test_an_adapter_saved_by_the_previous_version_reloads_with_the_rope_it_was_trained_at(
    name, target, expected, tmp_path
):
    build, _, _ = SCHEMES[name]
    base = model_of(build())
    base.save_pretrained(tmp_path / "base")
    get_peft_model(model_of(build()), LongLoraConfig(target_context_length=target, use_s2_attn=False)).save_pretrained(
        tmp_path / "adapter"
    )
    path = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(path.read_text())
    for key in ("original_rope_parameters", "rope_parameters", "shift", "inner_attn_implementation"):
        saved.pop(key)  # the 0.1.0 format: rope_type "linear" and the factor recorded, no RoPE
    saved.update(rope_type="linear", position_interpolation_factor=4.0, base_model_name_or_path=str(tmp_path / "base"))
    path.write_text(json.dumps(saved))
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").get_base_model().config
    if expected is None:
        assert (reloaded.rope_parameters, reloaded.max_position_embeddings) == (
            base.config.rope_parameters,
            base.config.max_position_embeddings,
        )
    else:
        assert (reloaded.rope_parameters, reloaded.max_position_embeddings) == expected


def test_dynamic_ntk_on_per_layer_type_rope_is_refused_since_it_would_extend_nothing():
    base = model_of(gemma3({**GEMMA3, "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}, 32768))
    with pytest.raises(ValueError, match="dynamic NTK reads that same value as its unscaled length"):
        get_peft_model(base, LongLoraConfig(target_context_length=65536, rope_type="dynamic", use_s2_attn=False))


def test_linear_scaling_without_a_recorded_original_says_how_it_was_read():
    base = model_of(linear())
    with pytest.warns(
        UserWarning,
        match=(
            r"read as the reference LongLoRA convention .* handles 8192 tokens"
            r".*original_max_position_embeddings'\] = 2048"
        ),
    ):
        get_peft_model(base, LongLoraConfig(target_context_length=16384, use_s2_attn=False))


@pytest.mark.parametrize(
    "arguments",
    [dict(target_context_length=value) for value in (0, -5, 1.5, "32k", True)]
    + [dict(target_context_length=8192, rope_type="llama3")],
    ids=["zero", "negative", "float", "string", "bool", "rope_type-llama3"],
)
def test_the_config_and_the_planner_refuse_the_same_values_in_the_same_words(arguments):
    with pytest.raises(ValueError) as from_config:
        LongLoraConfig(**arguments)
    with pytest.raises(ValueError) as from_planner:
        plan_position_interpolation(llama2(), **arguments)
    assert str(from_config.value) == str(from_planner.value)


def test_a_second_adapter_with_another_position_extension_is_refused_and_the_first_keeps_working(tmp_path):
    """Two LongLoRA adapters share one base RoPE: one trained for another extension would run on positions it was
    not trained for (logits off by up to 8 before), so loading it is refused; one of the same extension loads."""
    for name, target in (("a", 512), ("same", 512), ("other", 1024)):
        trained(
            get_peft_model(
                tiny_model("llama", seed=len(name)), LongLoraConfig(target_context_length=target, use_s2_attn=False)
            )
        ).save_pretrained(tmp_path / name)
    model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    ids = torch.randint(4, 128, (1, 400), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    rope = model.get_base_model().config.rope_parameters
    with pytest.raises(
        ValueError,
        match=r"RoPE default .* to linear \(factor 4.*other LongLoRA adapters run it extended to linear \(factor 2",
    ):
        model.load_adapter(tmp_path / "other", "other")
    model.load_adapter(tmp_path / "same", "same")
    model.set_adapter("default")
    assert model.get_base_model().config.rope_parameters == rope
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
