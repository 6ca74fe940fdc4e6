"""`LongLoraCallback`: checks a LongLoRA set-up when training starts and reports it, once."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import TrainerCallback

from ..attention import S2_ATTN_IMPLEMENTATION, S2AttentionSettings
from ..position_interpolation import context_length, describe_rope, rope_parameters_of
from ..tuner import TiledMLP, is_input_embedding, is_normalization, longlora_config_of
from .launch import DistributedSetup, check_launch
from .precision import precision, slow_bf16_warning
from .sequence_parallel import prepare_sequence_parallel


logger = logging.getLogger(__name__)


@dataclass
class LongLoraReport:
    """What the callback found at train start."""

    s2_attention: bool
    max_length: int | None
    group_size: int | None
    groups: int | None
    context_length: int | None
    position_interpolation_factor: float
    rope: str
    trainable: dict[str, int] = field(default_factory=dict)
    distributed: DistributedSetup | None = None
    quantization: str | None = None  # of the base model, e.g. "bitsandbytes 4-bit nf4 (compute float32)"
    precision: str | None = None  # e.g. "no autocast, float32 weights"; "bf16 autocast (emulated on this CPU: slow)"
    mlp_tiles: tuple[int, int] | None = None  # (tokens per tile, MLPs tiled) when LongLoRA's tiled MLP runs

    def __str__(self) -> str:
        attention = "S2-Attn off (dense attention)"
        if self.s2_attention:
            attention = (
                f"S2-Attn on: group size {self.group_size}, {self.groups} groups at max_length {self.max_length}"
            )
        counts = ", ".join(f"{name} {count:,}" for name, count in self.trainable.items())
        return (
            f"LongLoRA: {attention}; context {self.context_length} tokens (extended x"
            f"{self.position_interpolation_factor:g}, RoPE {self.rope}); trainable parameters: {counts}"
            + (f"; MLP in tiles of {self.mlp_tiles[0]} tokens ({self.mlp_tiles[1]} layers)" if self.mlp_tiles else "")
            + (f"; base quantized: {self.quantization}" if self.quantization else "")
            + (f"; precision: {self.precision}" if self.precision else "")
            + (f"; launch: {self.distributed}" if self.distributed is not None else "")
        )


def _mlp_tiles(model: nn.Module) -> tuple[int, int] | None:
    """(tokens per tile, MLPs tiled) of LongLoRA's tiled MLP in `model`, or None when no MLP is tiled."""
    tiled = [module.tile_size for module in model.modules() if isinstance(module, TiledMLP)]
    return (max(tiled), len(tiled)) if tiled else None


def _trainable_by_kind(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts by kind, the kinds with none left out: "LoRA" (an adapter layer's own
    weights), "embeddings" and "norms" (the input embedding and the normalization layers, found by module
    as LoRA+ finds them), "other" (anything else, e.g. an output head saved with the adapter)."""
    kind_of: dict[str, str] = {}  # module name -> kind; a module is of its parent's kind unless it is one itself
    modules = dict(model.named_modules())
    for name, module in modules.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = modules[parent_name] if name else None
        if isinstance(parent, BaseTunerLayer) and leaf in parent.adapter_layer_names:
            kind_of[name] = "LoRA"
        elif is_input_embedding(model, module):
            kind_of[name] = "embeddings"
        elif is_normalization(module):
            kind_of[name] = "norms"
        else:
            kind_of[name] = kind_of.get(parent_name, "other") if name else "other"
    counts = dict.fromkeys(("LoRA", "embeddings", "norms", "other"), 0)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:  # under ZeRO-3 a parameter is a shard here; ds_numel is its whole size
            counts[kind_of[name.rpartition(".")[0]]] += getattr(parameter, "ds_numel", None) or parameter.numel()
    return {kind: count for kind, count in counts.items() if count}


def _quantization(config) -> str | None:
    """How the base model's weights are quantized, from its config (`quantization_config`), or None."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    values = quantization if isinstance(quantization, dict) else quantization.to_dict()
    method = values.get("quant_method", "quantized")
    method = getattr(method, "value", method)
    if values.get("load_in_4bit"):
        compute = str(values.get("bnb_4bit_compute_dtype", "")).replace("torch.", "")
        return f"{method} 4-bit {values.get('bnb_4bit_quant_type', '')}" + (f" (compute {compute})" if compute else "")
    if values.get("load_in_8bit"):
        return f"{method} 8-bit"
    return str(method)


class LongLoraCallback(TrainerCallback):
    """Add to any `Trainer`/`SFTTrainer`: at train start it checks that the LongLoRA set-up can work and logs
    what it found (S2 on or off, group size and number of groups at `max_length`, the position
    interpolation factor, trainable parameter counts, the distributed set-up that runs), once, on the main
    process. A launch that does not run what it asked for (`launch.check_launch`) stops here. Evaluation inside
    training runs dense attention on its own ("s2" is dense in eval mode).

    Args:
        require_s2: Stop with an error when the model does not run S2-Attn. Default: required when the model's
            PEFT config asks for it.
        max_length: The training length, read from the training arguments (`max_length`, TRL) when not given.

    Raises:
        ValueError: At train start, a set-up that cannot work (S2 required but off, a launch that does not run
            what it asked for, sequences longer than the extended context), named with its fix.
    """

    def __init__(self, require_s2: bool | None = None, max_length: int | None = None):
        self.require_s2 = require_s2
        self.max_length = max_length
        self.report: LongLoraReport | None = None
        self.trainer_writes_card = False  # set by LongLoraSFTTrainer, whose pushes carry the LongLoRA card
        self._said_card = False

    def on_init_end(self, args, state, control, model=None, **kwargs):
        """Under DeepSpeed sequence parallelism, before accelerate prepares the model: the heads and the batch
        length must split over the ranks, and DeepSpeed must wrap the attention the model runs ("s2")."""
        if model is not None:
            prepare_sequence_parallel(model, args)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        distributed = check_launch()  # what the launch asked for is what runs, or stop before training
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config.get_text_config()
        peft_configs = getattr(model, "peft_config", {}) or {}
        wants_s2 = any(getattr(c, "use_s2_attn", False) for c in peft_configs.values())
        require_s2 = wants_s2 if self.require_s2 is None else self.require_s2
        runs_s2 = base.config._attn_implementation == S2_ATTN_IMPLEMENTATION
        if require_s2 and not runs_s2:
            raise ValueError(
                f"S2-Attn was requested, but the model runs attn_implementation={base.config._attn_implementation!r}. "
                "Use get_peft_model(model, LongLoraConfig(...)) or longlora_hf.use_s2_attention(model)."
            )
        max_length = self.max_length or getattr(args, "max_length", None)
        context = context_length(config)
        group_size = groups = None
        if runs_s2 and max_length:
            group_size = S2AttentionSettings.from_config(base.config).group_size_for(max_length)
            if group_size < 2:
                raise ValueError(
                    f"S2-Attn groups of {group_size} tokens at max_length {max_length}: groups need at least 2 "
                    "tokens. Raise group_size_ratio or set group_size."
                )
            groups = math.ceil(max_length / group_size)
        if max_length and context and max_length > context:
            raise ValueError(
                f"max_length {max_length} is beyond the model's context of {context} tokens "
                "(after position interpolation). Set target_context_length >= max_length in LongLoraConfig."
            )
        longlora = longlora_config_of(model)
        factor = (longlora.position_interpolation_factor if longlora else None) or 1.0
        rope = describe_rope(rope_parameters_of(config))
        ran = precision(args, model) + (" (emulated on this CPU: slow, see --bf16)" if slow_bf16_warning(args) else "")
        self.report = LongLoraReport(
            runs_s2,
            max_length,
            group_size,
            groups,
            context,
            factor,
            rope,
            _trainable_by_kind(model),
            distributed,
            _quantization(base.config),
            ran,
            _mlp_tiles(model),
        )
        if state.is_world_process_zero:
            logger.warning(str(self.report))

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        """A push from a plain `Trainer`/`SFTTrainer` publishes that trainer's card (written after the adapter is
        saved, out of a callback's reach): say so, once, and how to publish the LongLoRA card instead."""
        if (
            self.trainer_writes_card
            or self._said_card
            or not state.is_world_process_zero
            or longlora_config_of(model) is None
        ):
            return
        self._said_card = True
        logger.warning(
            "LongLoRA: this push publishes the trainer's own model card, not the LongLoRA card (context, position "
            "interpolation, S2-Attn group size, trainable parts). For the LongLoRA card use "
            "longlora_hf.training.LongLoraSFTTrainer in place of SFTTrainer (same arguments), or publish after "
            "training with longlora_hf.hub.push_adapter_to_hub(trainer.model, repo_id)."
        )
