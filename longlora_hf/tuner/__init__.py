"""`LongLoraConfig`, a PEFT tuner: LoRA+ (LoRA, trainable embeddings and norms) with S2-Attn and position interpolation."""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

from .config import PEFT_TYPE, LongLoraConfig, longlora_config_of
from .export import save_as_plain_lora
from .model import LongLoraModel, prepare_model_for_longlora
from ..position_interpolation import (
    PositionInterpolation,
    apply_position_interpolation,
    context_length,
    describe_rope,
    plan_position_interpolation,
)

__all__ = [
    "LongLoraConfig",
    "LongLoraModel",
    "PositionInterpolation",
    "apply_position_interpolation",
    "context_length",
    "describe_rope",
    "longlora_config_of",
    "plan_position_interpolation",
    "prepare_model_for_longlora",
    "register_tuner",
    "save_as_plain_lora",
]


def _add_peft_type(value: str) -> None:
    # PEFT's `register_peft_method` only accepts names already in its `PeftType` enum, which has no
    # entry point for third-party methods, so the member is added here, once.
    if value in PeftType.__members__:
        return
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    type.__setattr__(PeftType, value, member)


def register_tuner() -> None:
    """Register LongLoRA with PEFT as peft_type "LONGLORA" (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    _add_peft_type(PEFT_TYPE)
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(PeftType.LONGLORA) is LongLoraConfig:
        return
    register_peft_method(name="longlora", config_cls=LongLoraConfig, model_cls=LongLoraModel, prefix="lora_")
