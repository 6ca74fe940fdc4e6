"""Registration of the "s2" backend with transformers: its attention function and its mask function."""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .s2 import s2_attention_forward, s2_mask
from .settings import S2_ATTN_IMPLEMENTATION


def register_attention() -> None:
    """Register "s2" with transformers: the attention function and its mask function."""
    AttentionInterface.register(S2_ATTN_IMPLEMENTATION, s2_attention_forward)
    # Without a mask function of the same name, `create_causal_mask` returns None and padding is lost.
    AttentionMaskInterface.register(S2_ATTN_IMPLEMENTATION, s2_mask)
