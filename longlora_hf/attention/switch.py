"""`use_s2_attention`: switching a loaded model to the "s2" backend, with its settings."""

from __future__ import annotations

import torch

from .compatibility import check_s2_compatible
from .settings import S2_ATTN_IMPLEMENTATION, S2AttentionSettings, inner_attn_implementation_for


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

    Args:
        model (`torch.nn.Module`):
            A loaded transformers causal LM; switched in place.
        group_size_ratio (`float`, defaults to 0.25):
            Group size as a fraction of each sequence's length, in (0, 1]; ignored when `group_size` is set.
        group_size (`int`, *optional*):
            Absolute group size in tokens (at least 2); overrides `group_size_ratio`.
        inner_attn_implementation (`str`, *optional*):
            The kernel of the groups and of dense attention: "sdpa" or "flash_attention_2". None follows the
            model, as above.
        shift (`bool`, defaults to True):
            Shift the groups of half of the heads by half a group; False gives plain short attention.

    Returns:
        `S2AttentionSettings`: the settings written to the model's config (and to its text config, when the
        model is composite).

    Raises:
        `ValueError`: when a setting is out of range (see `S2AttentionSettings`), or S2-Attn cannot run on the
            model (`check_s2_compatible`); the model is left unchanged.
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
