"""`LongLoraConfig`, a PEFT tuner: LoRA+ (LoRA, trainable embeddings and norms) with S2-Attn and position
interpolation."""

from ..position_interpolation import (
    PositionInterpolation,
    apply_position_interpolation,
    context_length,
    describe_rope,
    plan_position_interpolation,
)
from .config import PEFT_TYPE, LongLoraConfig, longlora_config_of
from .export import load_plain_lora, save_as_plain_lora
from .model import (
    ADAPTER_PREFIX,
    LongLoraModel,
    TiedModulesToSaveWrapper,
    TiedOutputHead,
    check_adapter_fits,
    check_adapter_weights,
    is_input_embedding,
    is_normalization,
    prepare_model_for_longlora,
)
from .registration import register_tuner
from .tiled_mlp import TiledMLP, tile_mlps, untile_mlps


__all__ = [
    "ADAPTER_PREFIX",
    "LongLoraConfig",
    "LongLoraModel",
    "PositionInterpolation",
    "TiedModulesToSaveWrapper",
    "TiedOutputHead",
    "TiledMLP",
    "apply_position_interpolation",
    "check_adapter_fits",
    "check_adapter_weights",
    "context_length",
    "describe_rope",
    "is_input_embedding",
    "is_normalization",
    "load_plain_lora",
    "longlora_config_of",
    "plan_position_interpolation",
    "prepare_model_for_longlora",
    "register_tuner",
    "save_as_plain_lora",
    "tile_mlps",
    "untile_mlps",
]
