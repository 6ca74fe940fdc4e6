"""`attn_implementation="s2"` on every architecture that dispatches attention through transformers' registry."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import longlora_hf
from longlora_hf.attention import S2AttentionSettings, S2ForwardMemo, s2, use_s2_attention
from longlora_hf.attention.s2 import s2_attention_forward
from support.helpers import ARCHITECTURES, COMMON, shadow_longlora_hf, tiny_config, tiny_model
from support.s2_reference import masked_attention, s2_reference_mask


ARCHS = list(ARCHITECTURES)


def batch(n=24, lengths=(24, 17), seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (len(lengths), n), generator=generator)
    attention_mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, attention_mask


def register_reference(real, position_ids=None, **groups):
    """Register "s2_reference": the explicit-mask float64 reference, told the padding and documents by the test."""

    def reference_attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        mask = s2_reference_mask(
            real, query.shape[1], position_ids=position_ids, sliding_window=sliding_window, **groups
        )
        return masked_attention(query, key, value, mask, scaling).to(query.dtype), None

    AttentionInterface.register("s2_reference", reference_attention)
    AttentionMaskInterface.register("s2_reference", sdpa_mask)


def register_spy(calls):
    """Register "s2_spy": S2 itself, recording what each layer hands it. Switch to it after `use_s2_attention`."""

    def spy(module, query, key, value, attention_mask, sliding_window=None, **kwargs):
        calls.append(dict(sliding_window=sliding_window, query_dim=query.shape[-1], value_dim=value.shape[-1]))
        return s2_attention_forward(module, query, key, value, attention_mask, sliding_window=sliding_window, **kwargs)

    AttentionInterface.register("s2_spy", spy)
    AttentionMaskInterface.register("s2_spy", longlora_hf.attention.s2_mask)


def recorded_layouts(monkeypatch) -> list:
    """Record every layout S2 computes, with the thread that computed it: (thread id, layout)."""
    layouts = []
    compute = s2.s2_layout

    def recording(*args, **kwargs):
        layout = compute(*args, **kwargs)
        layouts.append((threading.get_ident(), layout))
        return layout

    monkeypatch.setattr(s2, "s2_layout", recording)
    return layouts


def mask_kinds(model) -> int:
    """How many kinds of mask the layers of `model` get (Gemma 3: sliding-window and full)."""
    return len(set(getattr(model.config, "layer_types", None) or ["full_attention"]))


def expected_training(arch, seed, ids, attention_mask):
    """Logits and gradients of one training forward and backward of `arch` under the reference partition."""
    register_reference(attention_mask.bool())
    model = tiny_model(arch, seed=seed).double().train()
    model.set_attn_implementation("s2_reference")
    logits = model(ids, attention_mask=attention_mask).logits
    logits[attention_mask.bool()].pow(2).mean().backward()
    return logits.detach(), [p.grad for p in model.parameters()]


def flash_attn_varlen_stand_in(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size
):
    """A pure-torch flash_attn_varlen_func for the CPU that, like flash-attn 2, takes one head size only."""
    assert q.shape[-1] == k.shape[-1] == v.shape[-1], "flash-attn 2: query, key and value must share a head size"
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and causal and window_size == (-1, -1)
    repeat = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(repeat, 0), vs.repeat_interleave(repeat, 0)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        scores = (qs @ ks.transpose(-1, -2) * scale).masked_fill(
            torch.ones(end - start, end - start, dtype=torch.bool).triu(1), float("-inf")
        )
        out[start:end] = (torch.softmax(scores, -1) @ vs).transpose(0, 1)
    return out


def test_importing_the_package_registers_s2_and_its_mask_function():
    assert AttentionInterface._global_mapping["s2"] is longlora_hf.s2_attention_forward
    assert "s2" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_matches_the_reference_mask_on_a_padded_batch(arch):
    model = tiny_model(arch).double()
    ids, attention_mask = batch()
    register_reference(attention_mask.bool())
    model.set_attn_implementation("s2_reference")
    model.train()
    expected = model(ids, attention_mask=attention_mask).logits
    use_s2_attention(model)
    got = model(ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-10, rtol=0)


def test_the_added_architectures_have_the_features_they_stand_for():
    """Guards the table: each entry below really has the feature it was added for."""
    rope = tiny_config("llama3-rope").rope_parameters
    assert rope["rope_type"] == "llama3" and rope["original_max_position_embeddings"] < 24  # the tests' length
    for arch, experts, top_k in [
        ("mixtral", "num_local_experts", "num_experts_per_tok"),
        ("qwen3-moe", "num_experts", "num_experts_per_tok"),
        ("deepseek-v3", "n_routed_experts", "num_experts_per_tok"),
    ]:
        config = tiny_config(arch)
        assert 1 < getattr(config, top_k) < getattr(config, experts), arch
    layer_types = tiny_config("gemma3-interleaved").layer_types
    assert layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    config = tiny_config("deepseek-v3")
    assert config.v_head_dim != config.qk_nope_head_dim + config.qk_rope_head_dim


def test_gemma3_sliding_windows_reach_s2_per_layer_and_matter():
    """Gemma 3's 5 sliding layers hand S2 their window, its global layer none; and the window changes the result."""
    model = tiny_model("gemma3-interleaved").double().train()
    ids, attention_mask = batch()
    real = attention_mask.bool()
    calls = []
    use_s2_attention(model)
    register_spy(calls)
    model.set_attn_implementation("s2_spy")
    got = model(ids, attention_mask=attention_mask).logits
    assert [call["sliding_window"] for call in calls] == [3] * 5 + [None]

    def without_window(module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        mask = s2_reference_mask(real, query.shape[1])
        return masked_attention(query, key, value, mask, scaling).to(query.dtype), None

    AttentionInterface.register("s2_reference_without_window", without_window)
    AttentionMaskInterface.register("s2_reference_without_window", sdpa_mask)
    model.set_attn_implementation("s2_reference_without_window")
    assert (model(ids, attention_mask=attention_mask).logits[real] - got[real]).abs().max() > 1e-3


def test_deepseek_v3_hands_s2_a_value_head_size_of_its_own():
    """MLA: S2 receives values of head size 8 under queries and keys of 12, unpadded, and returns 8."""
    model = tiny_model("deepseek-v3").double().train()
    ids, attention_mask = batch()
    calls = []
    use_s2_attention(model)
    register_spy(calls)
    model.set_attn_implementation("s2_spy")
    model(ids, attention_mask=attention_mask)
    assert {(call["query_dim"], call["value_dim"]) for call in calls} == {(12, 8)}


def test_deepseek_v3_on_the_flash_attention_path_matches_the_reference(monkeypatch):
    """flash-attn 2 takes one head size: S2 pads MLA's narrower values for it and crops the output back.
    The kernel cannot run on the CPU; a stand-in that enforces its head-size rule runs instead."""
    monkeypatch.setattr(s2, "_load_flash_varlen", lambda: flash_attn_varlen_stand_in)
    model = tiny_model("deepseek-v3").double().train()
    ids, attention_mask = batch()
    real = attention_mask.bool()
    register_reference(real)
    model.set_attn_implementation("s2_reference")
    expected = model(ids, attention_mask=attention_mask).logits
    use_s2_attention(model, inner_attn_implementation="flash_attention_2")
    got = model(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got[real], expected[real], atol=1e-10, rtol=0)


@pytest.mark.parametrize("inner", ["sdpa", "flash_attention_2"])
@pytest.mark.parametrize("dim,value_dim", [(12, 8), (8, 12)])
def test_a_value_head_size_other_than_the_query_s_on_both_kernels(monkeypatch, inner, dim, value_dim):
    """The attention function alone, values narrower (MLA) and wider than queries, with padding and GQA."""
    monkeypatch.setattr(s2, "_load_flash_varlen", lambda: flash_attn_varlen_stand_in)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 22, dim, dtype=torch.float64, generator=generator)
    key = torch.randn(2, 2, 22, dim, dtype=torch.float64, generator=generator)
    value = torch.randn(2, 2, 22, value_dim, dtype=torch.float64, generator=generator)
    real = torch.arange(22)[None, :] < torch.tensor([22, 15])[:, None]
    settings = S2AttentionSettings(inner_attn_implementation=inner)
    module = SimpleNamespace(config=SimpleNamespace(s2_attention=asdict(settings)), training=True, is_causal=True)
    out, _ = s2_attention_forward(module, query, key, value, real)
    assert out.shape == (2, 22, 4, value_dim)
    expected = masked_attention(query, key, value, s2_reference_mask(real, 4))
    torch.testing.assert_close(out[real], expected[real], atol=1e-10, rtol=0)
    assert not out[~real].any()


def test_stablelm_dispatches_through_the_registry_and_matches_the_reference():
    """StableLM calls ALL_ATTENTION_FUNCTIONS without declaring `_supports_attention_backend`; switched
    with `set_attn_implementation("s2")` (partial RoPE, per-head q/k LayerNorm), S2 is exact on it."""
    extra = dict(num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.25, qk_layernorm=True)
    config = transformers.StableLmConfig(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = transformers.StableLmForCausalLM(config).double().train()
    ids, attention_mask = batch()
    real = attention_mask.bool()
    register_reference(real)
    model.set_attn_implementation("s2_reference")
    expected = model(ids, attention_mask=attention_mask).logits
    model.set_attn_implementation("s2")
    got = model(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got[real], expected[real], atol=1e-10, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral-sliding", "gemma3-interleaved", "deepseek-v3"])
def test_training_forward_matches_the_reference_on_packed_documents(arch):
    model = tiny_model(arch).double().train()
    position_ids = torch.cat([torch.arange(11), torch.arange(21)])[None]
    ids = torch.randint(4, 128, (1, 32), generator=torch.Generator().manual_seed(1))
    register_reference(torch.ones(1, 32, dtype=torch.bool), position_ids=position_ids)
    model.set_attn_implementation("s2_reference")
    expected = model(ids, position_ids=position_ids).logits
    use_s2_attention(model)
    got = model(ids, position_ids=position_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
def test_absolute_group_size_reaches_the_attention(arch):
    model = tiny_model(arch).double().train()
    ids, attention_mask = batch(lengths=(24, 24))
    register_reference(attention_mask.bool(), group_size=10)
    model.set_attn_implementation("s2_reference")
    expected = model(ids).logits
    use_s2_attention(model, group_size=10)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_mode_is_exactly_sdpa(arch):
    model = tiny_model(arch)
    ids, attention_mask = batch()
    model.set_attn_implementation("sdpa")
    expected = model(ids, attention_mask=attention_mask).logits
    use_s2_attention(model)
    model.eval()
    assert torch.equal(model(ids, attention_mask=attention_mask).logits, expected)


@pytest.mark.parametrize("arch", ["llama", "mistral-sliding", "gemma3", "gemma3-interleaved", "deepseek-v3"])
def test_generation_is_exactly_sdpa_even_in_training_mode(arch):
    model = tiny_model(arch)
    prompt = torch.randint(4, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    model.set_attn_implementation("sdpa")
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
    use_s2_attention(model)
    model.train()
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_mode_never_leaks_later_tokens(arch):
    model = tiny_model(arch).double()
    use_s2_attention(model)
    model.train()
    ids, _ = batch(lengths=(24, 24))
    cut = 13
    changed = ids.clone()
    changed[:, cut + 1 :] = torch.randint(
        4, 128, changed[:, cut + 1 :].shape, generator=torch.Generator().manual_seed(9)
    )
    outputs, grads = [], []
    for tokens in (ids, changed):
        model.zero_grad()
        logits = model(tokens).logits
        logits[:, : cut + 1].pow(2).mean().backward()
        outputs.append(logits[:, : cut + 1].detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-12, rtol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_s2_differs_from_dense_attention_in_training():
    """Guards the tests above: on these sizes S2 is really sparse, not dense under another name."""
    model = tiny_model("llama").train()
    ids, _ = batch(lengths=(24, 24))
    model.set_attn_implementation("sdpa")
    dense = model(ids).logits
    use_s2_attention(model)
    assert (model(ids).logits - dense).abs().max() > 1e-3


def test_optimizer_steps_follow_the_s2_reference_trajectory_not_the_dense_one():
    """Five AdamW steps through "s2" give the losses and weights of the same steps under the explicit mask of
    the partition, which differ from those of dense attention; and the loss goes down."""
    ids = torch.randint(4, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    register_reference(torch.ones(4, 32, dtype=torch.bool))
    trajectories = {}
    for attention in ("s2", "s2_reference", "sdpa"):
        model = tiny_model("llama").double().train()
        model.set_attn_implementation(attention)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(5):
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        trajectories[attention] = (torch.tensor(losses, dtype=torch.float64), [p.detach() for p in model.parameters()])
    (losses, weights), (reference_losses, reference_weights) = trajectories["s2"], trajectories["s2_reference"]
    torch.testing.assert_close(losses, reference_losses, atol=1e-10, rtol=0)
    for weight, reference in zip(weights, reference_weights):
        torch.testing.assert_close(weight, reference, atol=1e-10, rtol=0)
    assert (losses - trajectories["sdpa"][0]).abs().max() > 1e-3
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_from_pretrained_with_attn_implementation_s2(arch, tmp_path):
    tiny_model(arch).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="s2")
    assert model.config._attn_implementation == "s2"
    ids, _ = batch(lengths=(24, 24))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert torch.equal(model.eval()(ids).logits, reference(ids).logits)
    model.train()
    reference.train()
    assert not torch.allclose(model(ids).logits, reference(ids).logits)


def test_a_saved_s2_model_loads_in_plain_transformers_with_its_default_attention(tmp_path):
    model = tiny_model("llama")
    use_s2_attention(model, group_size_ratio=0.5)
    model.save_pretrained(tmp_path / "model")
    ids, _ = batch(lengths=(24, 24))
    expected = model.eval()(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import torch, transformers
        try:
            import longlora_hf
            raise SystemExit("longlora_hf must not be importable here")
        except ImportError:
            pass
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r})
        assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
        ids = torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)
        torch.save(model(ids).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": shadow_longlora_hf(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected, atol=0, rtol=0)


def test_settings_are_stored_on_the_config_and_survive_save_pretrained(tmp_path):
    model = tiny_model("llama")
    use_s2_attention(model, group_size=64)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="s2")
    assert S2AttentionSettings.from_config(reloaded.config) == S2AttentionSettings(group_size=64)


def test_a_model_that_does_not_dispatch_through_the_registry_is_refused():
    config = transformers.FalconConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, multi_query=True
    )
    model = transformers.FalconForCausalLM(config)
    with pytest.raises(ValueError, match="FalconForCausalLM does not dispatch attention through"):
        use_s2_attention(model)


def test_an_encoder_is_refused():
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    with pytest.raises(ValueError, match="BertForMaskedLM is non-causal.*attn_implementation='sdpa'"):
        use_s2_attention(transformers.BertForMaskedLM(config))


def test_an_encoder_loaded_with_s2_fails_clearly_in_training():
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertForMaskedLM(config)
    model.set_attn_implementation("s2")
    model.train()
    with pytest.raises(ValueError, match="non-causal"):
        model(torch.randint(0, 128, (1, 16)))


def deepseek_sparse_attention():
    """A tiny DeepSeek-V3.2: its attention picks the keys of each query with an indexer that reads the mask."""
    config = transformers.DeepseekV32Config(
        **{**COMMON, "num_attention_heads": 4, "num_key_value_heads": 4},
        moe_intermediate_size=16,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    )
    torch.manual_seed(0)
    return transformers.DeepseekV32ForCausalLM(config)


def test_a_model_with_a_sparse_attention_indexer_is_refused():
    """S2 reads only the padding from the mask, so the indexer's selection would be silently dropped."""
    model = deepseek_sparse_attention()
    with pytest.raises(
        ValueError, match=r"DeepseekV32ForCausalLM chooses the keys .* own indexer \(DeepseekV32Indexer"
    ):
        use_s2_attention(model)
    assert model.config._attn_implementation != "s2"


def test_a_model_that_uses_the_mask_as_a_tensor_fails_clearly_when_switched_to_s2_directly():
    model = deepseek_sparse_attention()
    model.set_attn_implementation("s2")
    model.train()
    with pytest.raises(
        TypeError, match="uses the attention mask as a tensor inside its layers.*attn_implementation='sdpa'"
    ):
        model(torch.randint(4, 128, (1, 16)))


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (15, 5)], ids=["smollm2-135m-heads", "smollm2-360m-heads"])
def test_smollm2s_odd_head_counts_train_with_s2_as_the_reference_partition(heads, kv_heads):
    """SmolLM2 (Llama architecture) has 9 / 3 and 15 / 5 query / kv heads: S2 shifts heads [H // 2, H)."""
    model = tiny_model(
        "llama", num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=8 * heads
    ).double()
    ids, attention_mask = batch()
    register_reference(attention_mask.bool())
    model.set_attn_implementation("s2_reference")
    model.train()
    expected = model(ids, attention_mask=attention_mask).logits
    use_s2_attention(model)
    got = model(ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-10, rtol=0)


def test_bad_settings_leave_the_model_unchanged():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"got 1.5"):
        use_s2_attention(model, group_size_ratio=1.5)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.config, "s2_attention")


def test_the_layout_is_computed_once_per_forward_not_once_per_layer(monkeypatch):
    layouts = recorded_layouts(monkeypatch)
    model = tiny_model("llama", num_hidden_layers=3)
    use_s2_attention(model)
    model.train()
    ids, attention_mask = batch()
    model(ids, attention_mask=attention_mask)
    assert len(layouts) == 1
    attention_mask[1, 10:] = 0  # the next forward (another batch) builds its own layout
    model(ids, attention_mask=attention_mask)
    assert len(layouts) == 2


def test_interleaved_layer_kinds_compute_the_layout_once_per_mask_not_once_per_switch(monkeypatch):
    """Gemma 3 alternates a sliding-window mask and a global one (twice here: 12 layers): two layouts, not four."""
    layouts = recorded_layouts(monkeypatch)
    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 2
    model = tiny_model("gemma3-interleaved", num_hidden_layers=12, layer_types=layer_types)
    use_s2_attention(model)
    model.train()
    ids, attention_mask = batch()
    model(ids, attention_mask=attention_mask)
    assert len(layouts) == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_computes_the_layout_once_per_forward_and_mask_kind(arch, monkeypatch):
    layouts = recorded_layouts(monkeypatch)
    model = tiny_model(arch)
    use_s2_attention(model)
    model.train()
    ids, attention_mask = batch()
    for forwards in (1, 2):
        model(ids, attention_mask=attention_mask)
        assert len(layouts) == forwards * mask_kinds(model)


def checkpointed_training_step(monkeypatch):
    """One training step of Gemma 3 (two mask kinds) under gradient checkpointing: (the layouts computed,
    the model, its outputs)."""
    layouts = recorded_layouts(monkeypatch)
    model = tiny_model("gemma3-interleaved")
    use_s2_attention(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, attention_mask = batch()
    outputs = model(ids, attention_mask=attention_mask, labels=ids)
    outputs.loss.backward()
    return layouts, model, outputs


def test_gradient_checkpointing_recomputes_the_layers_with_the_layouts_of_their_forward(monkeypatch):
    layouts, model, _ = checkpointed_training_step(monkeypatch)
    assert len(layouts) == mask_kinds(model) == 2


def test_a_model_loaded_with_attn_implementation_s2_computes_the_layout_once_per_forward(tmp_path, monkeypatch):
    tiny_model("llama", num_hidden_layers=3).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="s2").train()
    layouts = recorded_layouts(monkeypatch)
    ids, attention_mask = batch()
    model(ids, attention_mask=attention_mask)
    assert len(layouts) == 1


# Two batches of one shape, padded differently: a layout of one used for the other gives wrong outputs.
IDS, _ = batch()
TWO_MASKS = [batch(lengths=(24, 17))[1], batch(lengths=(13, 24))[1]]


def assert_trained_like(model, logits, attention_mask, expected):
    expected_logits, expected_grads = expected
    real = attention_mask.bool()
    torch.testing.assert_close(logits[real], expected_logits[real], atol=1e-10, rtol=0)
    for parameter, expected_grad in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(parameter.grad, expected_grad, atol=1e-10, rtol=0)


def test_two_models_in_interleaved_forwards_each_use_their_own_layouts():
    """Both forwards run before either backward, and under gradient checkpointing each backward recomputes
    its model's layers after the other model's forward."""
    expected = [expected_training("llama", seed, IDS, mask) for seed, mask in enumerate(TWO_MASKS)]
    models = []
    for seed in range(2):
        model = tiny_model("llama", seed=seed).double()
        use_s2_attention(model)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        models.append(model.train())
    logits = [model(IDS, attention_mask=mask).logits for model, mask in zip(models, TWO_MASKS)]
    for model_logits, mask in zip(logits, TWO_MASKS):
        model_logits[mask.bool()].pow(2).mean().backward()
    for model, model_logits, mask, model_expected in zip(models, logits, TWO_MASKS, expected):
        assert_trained_like(model, model_logits.detach(), mask, model_expected)


def test_two_threads_training_two_models_at_once_each_use_their_own_layouts(monkeypatch):
    expected = [expected_training("llama", seed, IDS, mask) for seed, mask in enumerate(TWO_MASKS)]
    layouts = recorded_layouts(monkeypatch)
    same_layer = threading.Barrier(2, timeout=60)

    def in_step(module, *args, **kwargs):
        same_layer.wait()  # both forwards are in the same layer at once
        return s2_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("s2_in_step", in_step)
    AttentionMaskInterface.register("s2_in_step", longlora_hf.attention.s2_mask)
    models = []
    for seed in range(2):
        model = tiny_model("llama", seed=seed).double()
        use_s2_attention(model)
        model.set_attn_implementation("s2_in_step")
        models.append(model.train())
    results, errors = {}, []

    def train(index):
        try:
            logits = models[index](IDS, attention_mask=TWO_MASKS[index]).logits
            logits[TWO_MASKS[index].bool()].pow(2).mean().backward()
            results[index] = (threading.get_ident(), logits.detach())
        except BaseException as error:
            same_layer.abort()  # let the other thread fail instead of waiting for this one
            errors.append(error)

    threads = [threading.Thread(target=train, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, (thread, logits) in results.items():
        assert_trained_like(models[index], logits, TWO_MASKS[index], expected[index])
        assert len([layout for computed_by, layout in layouts if computed_by == thread]) == 1


def test_no_layout_outlives_its_forward(monkeypatch):
    """Layouts live in the forward's masks: once its outputs are gone (and with them the graph from which
    recomputation under gradient checkpointing reads the masks), nothing keeps them."""
    layouts, _, outputs = checkpointed_training_step(monkeypatch)
    computed = [weakref.ref(layout) for _, layout in layouts]
    layouts.clear()
    del outputs
    gc.collect()
    assert len(computed) == 2 and all(layout() is None for layout in computed)


def test_a_4d_mask_built_by_the_caller_trains_through_s2():
    """transformers hands such a mask to the layers as it is; S2 reads the padding from it."""
    model = tiny_model("llama").double().train()
    ids, attention_mask = batch()
    real = attention_mask.bool()
    mask_4d = (torch.ones(24, 24, dtype=torch.bool).tril() & real[:, None, :])[:, None]
    register_reference(real)
    model.set_attn_implementation("s2_reference")
    expected = model(ids, attention_mask=mask_4d).logits
    use_s2_attention(model)
    got = model(ids, attention_mask=mask_4d).logits
    torch.testing.assert_close(got[real], expected[real], atol=1e-10, rtol=0)


def test_attention_dropout_is_not_applied_in_evaluation():
    model = tiny_model("llama", attention_dropout=0.5)
    ids, attention_mask = batch()
    model.set_attn_implementation("sdpa")
    expected = model(ids, attention_mask=attention_mask).logits
    use_s2_attention(model)
    assert torch.equal(model(ids, attention_mask=attention_mask).logits, expected)  # eval mode, gradients enabled


@pytest.mark.parametrize("inner,expected_dims", [("sdpa", 4), ("flash_attention_2", 2)])
def test_the_s2_mask_function_makes_the_mask_its_inner_backend_expects(inner, expected_dims):
    """Without gradients (evaluation, generation) it is exactly the inner backend's mask; with them, the same
    mask inside the `S2ForwardMemo` that carries this forward's layouts."""
    from transformers.masking_utils import create_causal_mask

    config = tiny_config("llama")
    S2AttentionSettings(inner_attn_implementation=inner).write_to(config)
    _, attention_mask = batch()
    inputs = dict(inputs_embeds=torch.zeros(2, 24, 32), attention_mask=attention_mask, cache=None)
    config._attn_implementation = inner
    expected = create_causal_mask(config=config, **inputs)
    assert expected.dim() == expected_dims
    config._attn_implementation = "s2"
    with torch.no_grad():
        assert torch.equal(create_causal_mask(config=config, **inputs), expected)
    training = create_causal_mask(config=config, **inputs)
    assert isinstance(training, S2ForwardMemo) and torch.equal(training.inner, expected)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(use_reentrant):
    """Reentrant checkpointing (TRL's choice for PEFT under DeepSpeed ZeRO-3) runs each layer's forward without
    gradients; that forward is still a training forward, and must be S2 like its recomputation."""
    ids, attention_mask = batch()
    losses, grads = [], []
    for checkpointing in (False, True):
        model = tiny_model("llama").double()
        use_s2_attention(model)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.train()
        loss = model(ids, attention_mask=attention_mask, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-12, rtol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_a_batch_from_data_collator_with_flattening_is_grouped_per_document():
    """The packed format of TRL's padding_free=True: one row, position_ids restarting, flash-attn kwargs."""
    from transformers import DataCollatorWithFlattening

    generator = torch.Generator().manual_seed(5)
    features = [
        {"input_ids": torch.randint(4, 128, (length,), generator=generator).tolist()} for length in (13, 20, 7)
    ]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(features)
    model = tiny_model("llama").double().train()
    register_reference(torch.ones(1, 40, dtype=torch.bool), position_ids=packed["position_ids"])
    model.set_attn_implementation("s2_reference")
    expected = model(**packed).logits
    use_s2_attention(model)
    torch.testing.assert_close(model(**packed).logits, expected, atol=1e-10, rtol=0)


def test_set_attn_implementation_s2_on_a_loaded_model_uses_the_default_settings():
    model = tiny_model("qwen2").double().train()
    ids, attention_mask = batch()
    register_reference(attention_mask.bool(), group_size_ratio=0.25)
    model.set_attn_implementation("s2_reference")
    expected = model(ids, attention_mask=attention_mask).logits
    model.set_attn_implementation("s2")
    got = model(ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-10, rtol=0)


def test_bfloat16_training_is_close_to_float32():
    ids, attention_mask = batch()
    logits = []
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("llama").to(dtype)
        use_s2_attention(model)
        model.train()
        out = model(ids, attention_mask=attention_mask).logits
        out.float().sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        logits.append(out.float())
    real = attention_mask.bool()
    torch.testing.assert_close(logits[1][real], logits[0][real], atol=2e-2, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_groups_under_two_tokens_raise_in_training_outside_the_callback(arch):
    """Before, a ratio this small trained dense attention silently (the callback checks only under TRL)."""
    from peft import get_peft_model

    model = get_peft_model(tiny_model(arch), longlora_hf.LongLoraConfig(group_size_ratio=0.02)).train()
    ids, _ = batch(n=64, lengths=(64, 64))
    with pytest.raises(
        ValueError,
        match=(
            r"a training sequence of 64 tokens gets groups of int\(64 x group_size_ratio 0.02\) = 1 token\(s\); "
            r"groups need at least 2 tokens.*Raise group_size_ratio to at least 0.032 .*or set group_size"
        ),
    ):
        model(input_ids=ids, labels=ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # inference is dense anyway: nothing to refuse


def test_groups_under_two_tokens_at_the_target_context_are_refused_when_the_adapter_is_made():
    from peft import get_peft_model

    with pytest.raises(
        ValueError, match=r"sequence of 1024 tokens gets groups of int\(1024 x group_size_ratio 0.001\) = 1 token"
    ):
        get_peft_model(
            tiny_model("llama"), longlora_hf.LongLoraConfig(group_size_ratio=0.001, target_context_length=1024)
        )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sequences_too_short_for_two_token_groups_train_with_dense_attention(arch):
    """Below DENSE_BELOW_TOKENS a sequence is no longer than an S2 group: a short batch must not stop a run."""
    from peft import get_peft_model

    assert s2.DENSE_BELOW_TOKENS == 16
    model = get_peft_model(tiny_model(arch), longlora_hf.LongLoraConfig(group_size_ratio=0.25)).train()
    ids, _ = batch(n=7, lengths=(7,))  # int(7 x 0.25) = 1
    s2_loss = model(input_ids=ids, labels=ids).loss  # no error
    dense = get_peft_model(
        tiny_model(arch), longlora_hf.LongLoraConfig(group_size_ratio=0.25, use_s2_attn=False)
    ).train()
    dense.load_state_dict(model.state_dict())
    torch.testing.assert_close(s2_loss, dense(input_ids=ids, labels=ids).loss, atol=1e-6, rtol=0)
    packed = torch.arange(40) % 5  # eight 5-token documents in a 40-token row: short documents, long row
    assert torch.isfinite(
        model(input_ids=ids.new_full((1, 40), 7), position_ids=packed[None], labels=ids.new_full((1, 40), 7)).loss
    )


# 2025-26 layouts: hybrids whose linear-attention or Mamba layers do not use the attention registry, Llama 4's
# chunked attention beside NoPE full-attention layers, SmolLM3's NoPE layers. Tiny, with their real layer patterns.
# Experts run "eager": the default grouped_mm kernel has no float64 on the CPU.
SMALL = dict(
    COMMON,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    experts_implementation="eager",
)
LAYOUTS = {
    # Qwen3-Next: three Gated DeltaNet (linear attention) layers, then one gated full-attention layer.
    "qwen3-next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
        ),
    ),
    # Granite-4 (GraniteMoeHybrid): Mamba-2 layers and one attention layer, no RoPE (NoPE).
    "granite-4-hybrid": (
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        dict(
            layer_types=["mamba"] * 3 + ["attention"],
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=8,
            mamba_n_groups=1,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=32,
        ),
    ),
    # Llama 4: chunked attention on its RoPE layers (chunks of 12 here, 8192 in the checkpoints), every fourth
    # layer global and NoPE.
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            attention_chunk_size=12,
            num_local_experts=2,
            interleave_moe_layer_step=2,
            intermediate_size_mlp=64,
            no_rope_layers=[1, 1, 1, 0],
        ),
    ),
    # SmolLM3: every fourth layer NoPE.
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layers=[1, 1, 1, 0])),
}


def layout_model(name, seed=0, **overrides):
    config_cls, model_cls, extra = LAYOUTS[name]
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**SMALL, **extra, **overrides}))


def register_reference_by_layer_type(real):
    """ "s2_reference" where a chunked-attention layer keeps the model's own (chunked) mask: those layers train as
    they are; every other layer that reaches the registry gets the explicit S2 partition."""

    def reference_attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        if module.config.layer_types[module.layer_idx] == "chunked_attention":
            mask = attention_mask.expand(-1, query.shape[1], -1, -1)
        else:
            mask = s2_reference_mask(real, query.shape[1], sliding_window=sliding_window)
        return masked_attention(query, key, value, mask, scaling).to(query.dtype), None

    AttentionInterface.register("s2_reference", reference_attention)
    AttentionMaskInterface.register("s2_reference", sdpa_mask)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_hybrid_chunked_and_nope_layouts_train_s2_where_attention_reaches_the_registry(name):
    model = layout_model(name).double().train()
    ids, attention_mask = batch(n=32, lengths=(32, 32))
    register_reference_by_layer_type(attention_mask.bool())
    model.set_attn_implementation("s2_reference")
    expected = model(ids, attention_mask=attention_mask).logits
    model.set_attn_implementation("sdpa")
    dense = model(ids, attention_mask=attention_mask).logits
    use_s2_attention(model)
    got = model(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    assert (got - dense).abs().max() > 1e-6  # S2 did run on the full-attention layers


def test_llama4s_chunked_layers_keep_their_chunks_in_training():
    """Against the alternative: S2 groups everywhere, chunks ignored, is another result."""
    model = layout_model("llama4").double().train()
    ids, attention_mask = batch(n=32, lengths=(32, 32))
    use_s2_attention(model)
    got = model(ids, attention_mask=attention_mask).logits
    register_reference(attention_mask.bool())
    model.set_attn_implementation("s2_reference")
    assert (got - model(ids, attention_mask=attention_mask).logits).abs().max() > 1e-6


def test_qwen3_next_is_accepted_although_it_does_not_declare_backend_support():
    model = layout_model("qwen3-next")
    assert not type(model)._supports_attention_backend
    use_s2_attention(model)
    assert model.config._attn_implementation == "s2"


@pytest.mark.parametrize(
    "name,no_rope_layers,changes", [("smollm3", [0, 0, 0, 0], False), ("smollm3", [1, 1, 1, 0], True)]
)
def test_position_interpolation_changes_nothing_in_nope_layers(name, no_rope_layers, changes):
    """With every layer NoPE the extension changes no logit; with RoPE layers it does (zero-initialised LoRA)."""
    from peft import get_peft_model

    from longlora_hf import LongLoraConfig

    model = layout_model(name, no_rope_layers=no_rope_layers, max_position_embeddings=64).eval()
    ids = torch.randint(4, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        after = get_peft_model(model, LongLoraConfig(target_context_length=128)).eval()(ids).logits
    assert bool((after - before).abs().max() > 1e-6) == changes


def test_a_nope_hybrid_without_a_rotary_module_refuses_an_extension_and_trains_without_one():
    from peft import get_peft_model

    from longlora_hf import LongLoraConfig

    with pytest.raises(
        ValueError, match=r"no RoPE \(NoPE.*target_context_length=None \(LoRA\+ and S2-Attn still apply"
    ):
        get_peft_model(layout_model("granite-4-hybrid"), LongLoraConfig(target_context_length=512))
    model = get_peft_model(layout_model("granite-4-hybrid"), LongLoraConfig())
    assert model.get_base_model().config._attn_implementation == "s2"
