"""The `attn_implementation="s2"` backend: shifted sparse attention in training, dense otherwise."""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .s2 import (
    WITHOUT_S2,
    S2Layout,
    S2Mask,
    check_attention_kwargs,
    check_causal,
    check_group_size,
    s2_attention_forward,
    s2_layout,
    s2_mask,
)
from .settings import (
    INNER_ATTN_IMPLEMENTATIONS,
    S2_ATTN_IMPLEMENTATION,
    S2AttentionSettings,
    inner_attn_implementation_for,
    s2_field,
)


__all__ = [
    "INNER_ATTN_IMPLEMENTATIONS",
    "S2_ATTN_IMPLEMENTATION",
    "S2AttentionSettings",
    "S2Layout",
    "S2Mask",
    "check_attention_kwargs",
    "check_group_size",
    "check_s2_compatible",
    "check_s2_compatible_config",
    "dispatches_through_the_registry",
    "inner_attn_implementation_for",
    "register_attention",
    "s2_attention_forward",
    "s2_field",
    "s2_layout",
    "s2_mask",
    "use_s2_attention",
]


def register_attention() -> None:
    """Register "s2" with transformers: the attention function and its mask function."""
    AttentionInterface.register(S2_ATTN_IMPLEMENTATION, s2_attention_forward)
    # Without a mask function of the same name, `create_causal_mask` returns None and padding is lost.
    AttentionMaskInterface.register(S2_ATTN_IMPLEMENTATION, s2_mask)


def dispatches_through_the_registry(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention reaches the function registered for its `attn_implementation`: declared by the
    class (`_supports_attention_backend`), or, for hybrids that leave it unset (Qwen3-Next: linear-attention layers
    beside full-attention ones), read from the source of its attention modules, which look the function up in
    `ALL_ATTENTION_FUNCTIONS`. Layers that do not (linear attention, Mamba) train as they are."""
    if getattr(type(model), "_supports_attention_backend", False):
        return True
    for module_type in {type(module) for module in model.modules() if type(module).__name__.endswith("Attention")}:
        try:
            if "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(module_type.forward):
                return True
        except (OSError, TypeError):  # no source (compiled, or built at run time)
            continue
    return False


def check_s2_compatible(model: torch.nn.Module) -> None:
    """Raise a clear error when S2-Attn cannot run on `model`."""
    if not dispatches_through_the_registry(model):
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface (no "
            "attention module looks its function up in ALL_ATTENTION_FUNCTIONS, and `_supports_attention_backend` is "
            f"unset), so attn_implementation='s2' would not reach it: {WITHOUT_S2}."
        )
    indexers = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Indexer")})
    if indexers:
        raise ValueError(
            f"{type(model).__name__} chooses the keys each query attends to with its own indexer ({indexers[0]}, "
            "DeepSeek sparse attention) and reads the attention mask to do so. S2-Attn replaces the attention "
            f"pattern, so it would train without that selection: {WITHOUT_S2}."
        )
    causal_flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    check_causal(not causal_flags or any(causal_flags), f"every attention layer of {type(model).__name__}")
    softcap = getattr(model.config.get_text_config(), "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(
            f"S2-Attn does not support attention logit soft-capping ({type(model).__name__}: attn_logit_softcapping="
            f"{softcap}): its grouped kernels would train without it: {WITHOUT_S2}."
        )


def check_s2_compatible_config(config) -> None:
    """`check_s2_compatible` on the causal LM `config` describes, built on the meta device (no weights, no memory):
    what can be refused before a model is loaded. The class is built directly, not through
    `AutoModelForCausalLM.from_config`, which under DeepSpeed ZeRO-3 builds inside `deepspeed.zero.Init` and left
    the model loaded next unable to initialise its buffers. A config transformers does not map to a causal LM
    class (remote code) is checked when the model is loaded."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        return
    with torch.device("meta"):
        model = model_class(config)
    check_s2_compatible(model)


def use_s2_attention(
    model: torch.nn.Module,
    group_size_ratio: float = 0.25,
    group_size: int | None = None,
    inner_attn_implementation: str | None = None,
    shift: bool = True,
) -> S2AttentionSettings:
    """Switch a loaded transformers model to S2-Attn with the given group size; returns the settings.

    Same as `model.set_attn_implementation("s2")`, plus validation and the group size. The settings
    are stored in `model.config.s2_attention`, so `save_pretrained` records them; plain transformers
    ignores that key and loads the model with its default attention. `inner_attn_implementation=None`
    follows the attention the model was loaded with (`flash_attention_2` stays flash-attn, else `sdpa`;
    a model already on "s2" keeps its inner kernel).
    """
    if inner_attn_implementation is None:
        loaded = model.config._attn_implementation
        inner_attn_implementation = (
            S2AttentionSettings.from_config(model.config).inner_attn_implementation
            if loaded == S2_ATTN_IMPLEMENTATION
            else inner_attn_implementation_for(loaded)
        )
    settings = S2AttentionSettings(
        group_size_ratio=group_size_ratio,
        group_size=group_size,
        shift=shift,
        inner_attn_implementation=inner_attn_implementation,
    )
    check_s2_compatible(model)
    settings.write_to(model.config)
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        settings.write_to(text_config)
    model.set_attn_implementation(S2_ATTN_IMPLEMENTATION)
    return settings
