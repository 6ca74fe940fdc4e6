"""The memory options of a LongLoRA run, against the same run without them (float64, same seed):

- LongLoRA's tiled MLP (`LongLoraConfig(mlp_tile_size=...)`): each decoder layer's dense MLP runs in tiles of tokens,
  recomputed per tile in the backward pass; the loss and every gradient equal the untiled run's, with and without
  gradient checkpointing (under sequence parallelism: tests/test_sequence_parallel.py, "gqa-tiled-checkpointed");
- activation offloading (saved-tensor hooks that hand back copies, as TRL's offloader does) around S2-Attn training:
  the same gradients; what under gradient checkpointing reaches those hooks.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from longlora_hf import LongLoraConfig
from longlora_hf.tuner.tiled_mlp import TiledMLP
from support.helpers import tiny_model


TILE = 5  # tokens per tile: 2 rows of 24 tokens make 48, so 10 tiles, the last one short
ARCHITECTURES = ["llama", "qwen2", "gemma3", "phi3", "gpt-neox", "olmo2", "deepseek-v3"]
# LoRA on one MLP projection too, so that the MLP's own (LoRA) weights have gradients through the tiles
MLP_PROJECTION = {"phi3": "gate_up_proj", "gpt-neox": "dense_h_to_4h"}


def longlora(architecture: str, tile: int | None, checkpointing: str | None = None, **config):
    model = tiny_model(architecture).double()
    attention = {"gpt-neox": ["query_key_value"], "phi3": ["qkv_proj"]}.get(architecture, ["q_proj", "v_proj"])
    torch.manual_seed(1)
    config = LongLoraConfig(
        target_context_length=256,
        init_lora_weights=False,  # LoRA B random: every LoRA weight gets a gradient
        target_modules=[*attention, MLP_PROJECTION.get(architecture, "up_proj")],
        mlp_tile_size=tile,
        **config,
    )
    model = get_peft_model(model, config)
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
        model.enable_input_require_grads()
    return model.train()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, labels=ids)


def loss_and_gradients(model) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(**batch()).loss
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def rows_seen_by_the_mlps(model) -> list[int]:
    """Record the number of tokens each call of an MLP (inside its tiler) receives, recomputations included (a
    pre-hook: a checkpoint's recomputation stops after the last tensor it needs, before the post-hooks)."""
    seen = []
    for module in model.modules():
        if isinstance(module, TiledMLP):
            module.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:-1].numel()))
    return seen


TILES = 12  # 24 positions of 2 rows, in tiles of 5 // 2 = 2 positions


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_tiled_mlp_gives_the_untiled_loss_and_gradients(architecture, checkpointing):
    """Dense MLPs of every shape (gate/up, fused gate_up, GPT-NeoX's 4h) and DeepSeek-V3's dense first layer beside
    its MoE layers; no checkpointing, and PyTorch's two kinds of gradient checkpointing around the tiles."""
    expected_loss, expected = loss_and_gradients(longlora(architecture, None, checkpointing))
    model = longlora(architecture, TILE, checkpointing)
    seen = rows_seen_by_the_mlps(model)
    loss, gradients = loss_and_gradients(model)
    tiled = sum(isinstance(m, TiledMLP) for m in model.modules())
    assert seen and max(seen) <= TILE  # the MLPs really ran in tiles
    # each tile runs twice, its forward and its recomputation in the backward; under gradient checkpointing the
    # layer's recomputation runs the tiles once more (until the last tensor it needs: a few tiles can be left out)
    if checkpointing is None:
        assert len(seen) == 2 * TILES * tiled
    else:
        assert 2 * TILES * tiled < len(seen) <= 3 * TILES * tiled
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    assert set(gradients) == set(expected)
    mlp_gradients = [name for name in expected if ".mlp." in name and "lora_" in name]
    assert mlp_gradients  # the MLP's own LoRA weights are among those compared
    for name, gradient in expected.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-10, atol=1e-13, msg=name)


def test_without_gradients_the_tiles_run_one_after_another_with_the_untiled_logits():
    untiled, tiled = longlora("llama", None).eval(), longlora("llama", TILE).eval()
    seen = rows_seen_by_the_mlps(tiled)
    with torch.no_grad():
        expected, got = untiled(**batch()).logits, tiled(**batch()).logits
    assert seen and max(seen) <= TILE
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_sequence_within_one_tile_runs_untiled():
    model = longlora("llama", 10_000)
    seen = rows_seen_by_the_mlps(model)
    model(**batch()).loss.backward()
    assert seen == [48, 48]  # one call of all 48 tokens per layer (2 layers), and no recomputation


def test_tiling_keeps_every_parameter_name_and_the_saved_adapter(tmp_path):
    plain, tiled = longlora("llama", None), longlora("llama", TILE)
    assert [name for name, _ in tiled.named_parameters()] == [name for name, _ in plain.named_parameters()]
    assert tiled.state_dict().keys() == plain.state_dict().keys()
    tiled.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model("llama").double(), tmp_path / "adapter")
    assert loaded.peft_config["default"].mlp_tile_size == TILE  # recorded with the adapter
    assert not any(isinstance(m, TiledMLP) for m in loaded.modules())  # loaded for inference: untiled, like S2


@pytest.mark.parametrize("leave", ["merge_and_unload", "unload", "delete_adapter"])
def test_leaving_longlora_gives_the_base_its_own_mlp_modules_back(leave):
    model = longlora("llama", TILE)
    base_mlp = type(tiny_model("llama").model.layers[0].mlp)
    if leave == "delete_adapter":
        model.base_model.delete_adapter("default")
        base = model.base_model.model
    else:
        base = getattr(model, leave)()
    assert not any(isinstance(m, TiledMLP) for m in base.modules())
    assert all(type(layer.mlp) is base_mlp for layer in base.model.layers)


def test_mixture_of_experts_blocks_are_not_tiled_and_a_model_of_only_those_is_refused():
    model = longlora("deepseek-v3", TILE)
    layers = model.base_model.model.model.layers
    assert isinstance(layers[0].mlp, TiledMLP) and not isinstance(layers[1].mlp, TiledMLP)
    # Qwen3-MoE's dense layers are `Qwen3MoeMLP`: MoE is read from the structure (experts, a router), not the name
    qwen = get_peft_model(
        tiny_model("qwen3-moe", mlp_only_layers=[0]), LongLoraConfig(target_context_length=256, mlp_tile_size=TILE)
    )
    layers = qwen.base_model.model.model.layers
    assert isinstance(layers[0].mlp, TiledMLP) and not isinstance(layers[1].mlp, TiledMLP)
    with pytest.raises(ValueError, match=r"mlp_tile_size=5 found no dense MLP to tile in MixtralForCausalLM.*Mixtral"):
        get_peft_model(tiny_model("mixtral"), LongLoraConfig(target_context_length=256, mlp_tile_size=TILE))


@pytest.mark.parametrize("value", [0, -4, 2.5, "8", True])
def test_a_tile_size_that_is_not_a_number_of_tokens_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=rf"mlp_tile_size={value!r} is not a number of tokens"):
        LongLoraConfig(mlp_tile_size=value)


def copying_hooks(packed: list[int]):
    """Saved-tensor hooks that hand autograd a copy of each saved activation, as an offloader does (TRL's
    `activation_offloading`: copied to CPU memory in the forward, back in the backward), skipping parameters and
    tensors under 1 KiB as TRL does; counts the bytes copied in `packed`."""

    def pack(tensor):
        if isinstance(tensor, torch.nn.Parameter) or tensor.numel() * tensor.element_size() < 1024:
            return tensor
        packed.append(tensor.numel() * tensor.element_size())
        return tensor.detach().clone()  # a tensor of its own storage, as one brought back from the CPU is

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


@pytest.mark.parametrize("checkpointing", [None, "reentrant"])
@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_s2_training_under_activation_offloading_hooks_gives_the_same_gradients(architecture, checkpointing):
    """Activation offloading is saved-tensor hooks around the step (TRL's `OffloadActivations`, torch's
    `save_on_cpu`): S2-Attn's saved tensors (the groups of each half of the heads, views of one buffer) and the
    tiled MLP's must come back as copies and give the gradients they give without the hooks. Without checkpointing
    every activation goes through the hooks; under checkpointing the checkpointed layer inputs do
    (and, reentrant, the recomputed layers').
    What only a GPU shows (the transfer, the memory saved, TRL's streams) is in docs/memory.md."""
    expected_loss, expected = loss_and_gradients(longlora(architecture, TILE, checkpointing))
    packed = []
    model = longlora(architecture, TILE, checkpointing)
    with copying_hooks(packed):
        loss, gradients = loss_and_gradients(model)
    assert model.base_model.model.config._attn_implementation == "s2" and sum(packed) > 0
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    for name, gradient in expected.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
def test_the_checkpointed_layer_inputs_reach_the_offloading_hooks(checkpointing):
    """What activation offloading moves under gradient checkpointing: each decoder layer's input, saved through the
    saved-tensor hooks by both of PyTorch's checkpoints (the non-reentrant one, transformers' default, saves its
    inputs as saved tensors too), so an offloader (TRL's) can hold them in CPU memory."""
    model = longlora("llama", None, checkpointing)
    layer_inputs, storages = set(), []

    def record(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        layer_inputs.add(hidden.untyped_storage().data_ptr())

    for layer in model.base_model.model.model.layers:
        layer.register_forward_pre_hook(record, with_kwargs=True)
    with torch.autograd.graph.saved_tensors_hooks(  # the forward saves what the backward needs
        lambda t: storages.append(t.untyped_storage().data_ptr()) or t, lambda t: t
    ):
        loss = model(**batch()).loss
    loss.backward()
    assert len(layer_inputs) == 2 and layer_inputs <= set(storages)


def test_an_mlp_that_takes_the_residual_too_has_it_cut_with_the_hidden_states():
    """Bloom calls `mlp(hidden_states, residual)` (MPT's `ffn` too): the residual is one value per token, cut in the
    same tiles. S2-Attn off: Bloom's ALiBi is a bias S2 does not take."""
    from transformers import BloomConfig, BloomForCausalLM

    def bloom(tile):
        torch.manual_seed(0)
        base = BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4)).double()
        torch.manual_seed(1)
        config = LongLoraConfig(use_s2_attn=False, init_lora_weights=False, mlp_tile_size=tile)
        return get_peft_model(base, config).train()

    expected_loss, expected = loss_and_gradients(bloom(None))
    model = bloom(TILE)
    seen = rows_seen_by_the_mlps(model)
    loss, gradients = loss_and_gradients(model)
    assert seen and max(seen) <= TILE
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    for name, gradient in expected.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-10, atol=1e-13, msg=name)


def test_the_tiled_mlp_follows_the_models_training_mode_for_its_dropout():
    """Starcoder2's MLP drops out its output (`residual_dropout`) in training mode only: the MLP a tiler holds is not
    its child, so the tiler passes `train()`/`eval()` on."""
    model = longlora("llama", TILE)
    inner = [m.mlp for m in model.modules() if isinstance(m, TiledMLP)]
    model.eval()
    assert inner and not any(m.training for m in inner)
    model.train()
    assert all(m.training for m in inner)
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    torch.manual_seed(0)
    config = Starcoder2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        residual_dropout=0.5,
    )
    starcoder = get_peft_model(Starcoder2ForCausalLM(config).eval(), LongLoraConfig(mlp_tile_size=TILE)).train()
    ids = batch()["input_ids"]
    assert not torch.equal(starcoder(ids).logits, starcoder(ids).logits)  # dropout on while training
    starcoder.eval()
    with torch.no_grad():
        assert torch.equal(starcoder(ids).logits, starcoder(ids).logits)


def test_a_batch_of_rows_for_different_adapters_runs_tiled_with_each_rows_adapter():
    """PEFT's per-row adapters (`adapter_names`) index the batch dimension: the tiles keep it."""
    config = dict(trainable_norms=False, trainable_embeddings=False)
    model = longlora("llama", TILE, **config)
    model.add_adapter(
        "other",
        LongLoraConfig(
            target_context_length=256,
            init_lora_weights=False,
            target_modules=["q_proj", "v_proj", "up_proj"],
            mlp_tile_size=TILE,
            **config,
        ),
    )
    model.eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=["default", "other"]).logits
        model.set_adapter("default")
        first = model(ids[:1]).logits
        model.set_adapter("other")
        second = model(ids[1:]).logits
    torch.testing.assert_close(mixed, torch.cat([first, second]), rtol=1e-10, atol=1e-12)
