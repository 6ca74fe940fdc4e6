"""The `attn_implementation="s2"` backend: shifted sparse attention in training, dense otherwise."""

from .compatibility import check_s2_compatible, check_s2_compatible_config, dispatches_through_the_registry
from .registration import register_attention
from .s2 import (
    WITHOUT_S2,
    S2ForwardMemo,
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
from .switch import use_s2_attention


__all__ = [
    "INNER_ATTN_IMPLEMENTATIONS",
    "S2_ATTN_IMPLEMENTATION",
    "S2AttentionSettings",
    "S2Layout",
    "S2ForwardMemo",
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
