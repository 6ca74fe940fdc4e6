"""LongLoRA for the Hugging Face ecosystem. Importing the package registers everything it provides."""

from . import metrics
from .attention import (
    S2_ATTN_IMPLEMENTATION,
    S2AttentionSettings,
    register_attention,
    s2_attention_forward,
    use_s2_attention,
)
from .tuner import LongLoraConfig, load_plain_lora, register_tuner, save_as_plain_lora


__version__ = "0.2.0"


def register() -> None:
    """Register the package's plugins (idempotent): attn_implementation "s2" with transformers, and peft_type
    "LONGLORA" with PEFT, which first adds that member to PEFT's `PeftType` enum (the package's one change
    to another library's objects; `longlora_hf.tuner.registration._add_peft_type` says why and what would remove
    it)."""
    register_attention()
    register_tuner()


register()

__all__ = [
    "LongLoraConfig",
    "S2_ATTN_IMPLEMENTATION",
    "S2AttentionSettings",
    "metrics",
    "register",
    "s2_attention_forward",
    "load_plain_lora",
    "save_as_plain_lora",
    "use_s2_attention",
]
