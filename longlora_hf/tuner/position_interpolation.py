"""Position interpolation of RoPE (Chen et al., 2023), as LongLoRA uses it to reach a longer context.

The rule follows the reference training code: when the target context exceeds the model's current
context, RoPE positions are scaled linearly by `ceil(target / current)`. The current context is
`max_position_embeddings` times any linear factor the model already has (or, once this module has
interpolated it, the recorded `original_max_position_embeddings` times the factor), so interpolating
an already interpolated model composes the factors instead of starting over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("linear", "dynamic", "yarn")


@dataclass(frozen=True)
class PositionInterpolation:
    """A model's RoPE extension for a target context: `factor` is the total factor over the
    `original_context_length` the RoPE was trained at (1.0: none); `changes_the_model` says whether the
    model needs rescaling to reach it."""

    original_context_length: int
    target_context_length: int
    factor: float
    rope_type: str
    changes_the_model: bool


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def rope_parameters_of(config) -> dict | None:
    """The model's RoPE settings, or None when it has no rotary position embeddings."""
    config = _text_config(config)
    parameters = getattr(config, "rope_parameters", None)
    if parameters is None:
        return None
    if isinstance(parameters, dict) and "rope_type" not in parameters and all(isinstance(v, dict) for v in parameters.values()):
        raise ValueError(
            f"{type(config).__name__} keeps separate RoPE settings per layer type ({sorted(parameters)}); "
            "position interpolation of such models is not supported. Pass target_context_length=None."
        )
    return dict(parameters)


def current_context_length(config) -> tuple[int, float]:
    """(context the model handles now, its existing linear factor)."""
    config = _text_config(config)
    parameters = rope_parameters_of(config) or {}
    factor = float(parameters.get("factor", 1.0)) if parameters.get("rope_type") == "linear" else 1.0
    base = parameters.get("original_max_position_embeddings", config.max_position_embeddings)
    return int(base * factor), factor


def plan_position_interpolation(config, target_context_length: int, rope_type: str = "linear") -> PositionInterpolation:
    """The interpolation `target_context_length` needs on a model with this config (nothing is changed)."""
    if isinstance(target_context_length, bool) or not isinstance(target_context_length, int) or target_context_length <= 0:
        raise ValueError(
            f"target_context_length must be a positive integer number of tokens; got {target_context_length!r}. "
            "Use e.g. 32768, or None to keep the model's positions."
        )
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}; got {rope_type!r}.")
    if rope_parameters_of(config) is None:
        raise ValueError(
            f"{type(_text_config(config)).__name__} has no rotary position embeddings (RoPE): it uses learned absolute "
            "positions or ALiBi, which position interpolation cannot extend. Pass target_context_length=None "
            "(LoRA+ and S2-Attn still apply) or choose a RoPE model."
        )
    current, existing_factor = current_context_length(config)
    if target_context_length <= current:
        original = int(current / existing_factor)
        return PositionInterpolation(original, target_context_length, existing_factor, rope_type, False)
    step = float(math.ceil(target_context_length / current))
    if rope_type == "linear":
        factor = existing_factor * step
        original = int(current / existing_factor)
    else:
        if existing_factor != 1.0:
            raise ValueError(
                f"The model already has a linear RoPE factor of {existing_factor}; rope_type={rope_type!r} cannot be "
                "stacked on it. Use rope_type='linear'."
            )
        factor, original = step, current
    return PositionInterpolation(original, target_context_length, factor, rope_type, True)


def apply_position_interpolation(model: torch.nn.Module, target_context_length: int, rope_type: str = "linear") -> PositionInterpolation:
    """Rescale the model's RoPE for `target_context_length` (in place) and return what was done.

    Writes `rope_parameters` (type, factor, original context) and raises `max_position_embeddings` on the
    config, then rebuilds every rotary embedding module from the new config, since they compute their
    frequencies when they are built.
    """
    config = _text_config(model.config)
    plan = plan_position_interpolation(config, target_context_length, rope_type)
    if not plan.changes_the_model:
        return plan
    parameters = rope_parameters_of(config)
    parameters.update(
        rope_type=plan.rope_type, factor=plan.factor, original_max_position_embeddings=plan.original_context_length
    )
    config.rope_parameters = parameters
    config.max_position_embeddings = max(config.max_position_embeddings, target_context_length)
    _rebuild_rotary_embeddings(model, config)
    return plan


def _rebuild_rotary_embeddings(model: torch.nn.Module, config) -> None:
    rotary = [(name, module) for name, module in model.named_modules() if hasattr(module, "inv_freq") and hasattr(module, "rope_type")]
    if not rotary:
        raise ValueError(
            f"Found no rotary embedding module (one with `inv_freq`) in {type(model).__name__}; cannot apply "
            "position interpolation. Pass target_context_length=None."
        )
    for name, module in rotary:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        rebuilt = type(module)(config=config).to(module.inv_freq.device)
        setattr(parent, attribute, rebuilt)
