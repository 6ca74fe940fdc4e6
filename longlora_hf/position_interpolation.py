"""Position extension of RoPE for LongLoRA: every scheme transformers ships, extended by its own rule.

The paper extends Llama-2 (plain RoPE) by linear position interpolation (Chen et al., 2023): positions
are divided by `s = ceil(target / current context)`, as the reference training code does. Models of 2026
often come with RoPE that is already scaled. Here, for each `rope_type`:

- the *current context* is the context the model already handles (`context_length`);
- a target at or below it changes nothing (the factor is 1.0);
- a target above it extends the model's *own* scheme by `s` (`extend_rope_parameters`):

    scheme        current context                                         extension by s
    default       max_position_embeddings                                 linear, factor s (the paper)
    linear        original_max_position_embeddings (else max_position_    factor x s
                  embeddings) x factor
    proportional  max_position_embeddings                                 factor x s (linear on the rotated dims)
    dynamic       max_position_embeddings x factor (dynamic NTK keeps     factor x s; max_position_embeddings,
                  max_position_embeddings as its unscaled length)         its unscaled length, stays
    yarn          max(max_position_embeddings,                            factor x s over the same original:
                  original_max_position_embeddings x factor)              its extrapolated (high-frequency)
                                                                          dimensions stay untouched
    llama3        max_position_embeddings (Llama-3.1: 131072)             factor x s over the same original:
                                                                          high-frequency dimensions untouched
    longrope      max_position_embeddings (Phi-3.5: 131072)               long_factor x s, attention factor kept:
                                                                          sequences up to the original context
                                                                          (short factors) are untouched; a long
                                                                          one at position p*s sees what p saw
    per layer     max_position_embeddings (Gemma 3: 131072)               each layer type by its own scheme
    type                                                                  above, except sliding-window layers,
                                                                          whose distances never exceed the window

Whatever changes, `max_position_embeddings` becomes the new context (dynamic excepted, see above) and
every rotary module is rebuilt, since rotary modules compute their frequencies when they are built.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch


ROPE_TYPES = ("linear", "dynamic", "yarn")
"""The schemes `rope_type=` can create on a model with plain RoPE (None: the paper's linear)."""

EXTENDABLE_ROPE_TYPES = ("default", "linear", "proportional", "dynamic", "yarn", "llama3", "longrope")
SLIDING_LAYER_TYPE = "sliding_attention"


@dataclass(frozen=True)
class PositionInterpolation:
    """What reaching `target_context_length` takes on one model (nothing is changed by planning).

    `original_context_length`: the context the model handled before; `factor`: the extension s over the
    model's own scheme (1.0: none needed); `original_rope_parameters` / `rope_parameters`: the model's
    `rope_parameters` before and after; `max_position_embeddings`: the value after.

    Attributes:
        original_context_length (`int`): The context the model handled before, in tokens.
        target_context_length (`int`): The context planned for, in tokens.
        factor (`float`): The extension s over the model's own scheme; 1.0 when the target is within the context.
        original_rope_parameters (`dict`): The model's `rope_parameters` before.
        rope_parameters (`dict`): Its `rope_parameters` after.
        max_position_embeddings (`int`): Its `max_position_embeddings` after.
    """

    original_context_length: int
    target_context_length: int
    factor: float
    original_rope_parameters: dict
    rope_parameters: dict
    max_position_embeddings: int

    @property
    def changes_the_model(self) -> bool:
        """Whether the plan extends the positions (a factor above 1)."""
        return self.factor > 1.0


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_per_layer_type(parameters: dict) -> bool:
    return (
        "rope_type" not in parameters
        and bool(parameters)
        and all(isinstance(v, dict) or v is None for v in parameters.values())
    )


def rope_parameters_of(config) -> dict | None:
    """A copy of the model's RoPE settings (flat, or one dict per layer type), or None without RoPE.

    Args:
        config (`transformers.PreTrainedConfig`):
            A model config; a composite one is read through its text config.

    Returns:
        `dict` or `None`: a deep copy of its `rope_parameters`.
    """
    parameters = getattr(_text_config(config), "rope_parameters", None)
    return copy.deepcopy(dict(parameters)) if parameters else None


def _factor(parameters: dict) -> float:
    """The scheme's factor (transformers 5.x requires one for every scheme that has it, YaRN included)."""
    return float(parameters.get("factor") or 1.0)


def _scheme_context(parameters: dict, max_positions: int) -> int:
    rope_type = parameters.get("rope_type", "default")
    factor = _factor(parameters)
    if rope_type in ("default", "proportional", "llama3", "longrope"):
        return max_positions
    if rope_type == "linear":
        return int(parameters.get("original_max_position_embeddings", max_positions) * factor)
    if rope_type == "dynamic":
        return int(max_positions * factor)
    if rope_type == "yarn":
        return max(max_positions, int(parameters.get("original_max_position_embeddings", max_positions) * factor))
    raise ValueError(
        f"RoPE type {rope_type!r} is not one LongLoRA knows how to extend ({', '.join(EXTENDABLE_ROPE_TYPES)}). "
        "Pass target_context_length=None to train at the model's own context."
    )


def context_length(config) -> int | None:
    """The context the model handles now, in tokens, by the rules in this module's docstring (models without
    RoPE: `max_position_embeddings`).

    Args:
        config (`transformers.PreTrainedConfig`):
            A model config; a composite one is read through its text config.

    Returns:
        `int` or `None`: the context in tokens; None when the config has no `max_position_embeddings`.

    Raises:
        `ValueError`: when its RoPE type is not one this module knows how to extend.
    """
    config = _text_config(config)
    max_positions = getattr(config, "max_position_embeddings", None)
    parameters = rope_parameters_of(config)
    if parameters is None or max_positions is None or _is_per_layer_type(parameters):
        return max_positions
    return _scheme_context(parameters, max_positions)


def describe_rope(parameters: dict | None) -> str:
    """A one-line account of RoPE settings, for cards and reports: 'llama3 (factor 8, original 8192, theta 500000)'.

    Args:
        parameters (`dict`, *optional*):
            `rope_parameters`, flat or one dict per layer type.

    Returns:
        `str`: the account; "none" for no RoPE, and one account per layer type joined by "; ".
    """
    if not parameters:
        return "none"
    if _is_per_layer_type(parameters):
        return "; ".join(f"{layer}: {describe_rope(p)}" for layer, p in parameters.items() if p is not None)
    details = [
        f"{label} {parameters[key]:g}"
        if isinstance(parameters[key], (int, float))
        else f"{label} {len(parameters[key])} values"
        for key, label in (
            ("factor", "factor"),
            ("original_max_position_embeddings", "original"),
            ("long_factor", "long factors"),
            ("attention_factor", "attention factor"),
            ("rope_theta", "theta"),
        )
        if parameters.get(key) is not None
    ]
    return (
        f"{parameters.get('rope_type', 'default')} ({', '.join(details)})"
        if details
        else parameters.get("rope_type", "default")
    )


def _longrope_attention_factor(parameters: dict, max_positions: int) -> float:
    # transformers' rule (modeling_rope_utils._compute_longrope_parameters), kept fixed by the extension
    original = parameters["original_max_position_embeddings"]
    factor = parameters.get("factor") or max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _extend_scheme(
    parameters: dict, step: float, current: int, max_positions: int, rope_type: str | None, flat: bool
) -> dict:
    """One RoPE scheme extended by `step` (see the table in the module docstring)."""
    own = parameters.get("rope_type", "default")
    extended = dict(parameters)
    if own == "default":
        new_type = rope_type or "linear"
        extended.update(rope_type=new_type, factor=step)
        if new_type == "yarn" or (new_type == "linear" and flat):
            extended["original_max_position_embeddings"] = current
    elif own == "longrope":
        extended.setdefault("attention_factor", _longrope_attention_factor(parameters, max_positions))
        extended["long_factor"] = [value * step for value in parameters["long_factor"]]
    else:
        extended["factor"] = _factor(parameters) * step
        if own == "linear" and flat:
            extended.setdefault("original_max_position_embeddings", max_positions)
    return extended


def check_target_context_length(target_context_length) -> None:
    """Raise unless `target_context_length` is a positive integer number of tokens (a bool is not)."""
    if (
        isinstance(target_context_length, bool)
        or not isinstance(target_context_length, int)
        or target_context_length <= 0
    ):
        raise ValueError(
            f"target_context_length must be a positive integer number of tokens; got {target_context_length!r}. "
            "Use e.g. 32768, or None to keep the model's positions."
        )


def check_rope_type(rope_type) -> None:
    """Raise unless `rope_type` is None (extend the model's own scheme) or one of `ROPE_TYPES`."""
    if rope_type is not None and rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_type must be None (extend the model's own scheme) or one of {ROPE_TYPES}; got {rope_type!r}."
        )


def _check_rope_type_fits(rope_type: str | None, parameters: dict, owner: str) -> None:
    """Raise when `rope_type` would replace the model's own RoPE scaling, or the model's scheme is not extendable."""
    check_rope_type(rope_type)
    schemes = parameters.values() if _is_per_layer_type(parameters) else [parameters]
    for scheme in schemes:
        own = (scheme or {}).get("rope_type", "default")
        if own not in EXTENDABLE_ROPE_TYPES:
            _scheme_context(scheme, 0)  # raises, naming the type
        if rope_type is not None and own != "default" and own != rope_type:
            raise ValueError(
                f"rope_type={rope_type!r} would replace {owner}'s own RoPE scaling, {describe_rope(scheme)}, and "
                "change what the model computes at every length. Leave rope_type unset (None) to extend the model's "
                f"own {own!r} scheme, which keeps what it leaves untouched."
            )


def plan_position_interpolation(
    config, target_context_length: int, rope_type: str | None = None
) -> PositionInterpolation:
    """What reaching `target_context_length` takes on a model with this config (nothing is changed).

    `rope_type=None` extends the model's own scheme; 'linear', 'dynamic' or 'yarn' choose the scheme for a
    model with plain RoPE, and are refused where they would replace another scheme.

    Args:
        config (`transformers.PreTrainedConfig`):
            The model's config (a composite one is read through its text config); not changed.
        target_context_length (`int`):
            The context to reach, in tokens.
        rope_type (`str`, *optional*):
            As above.

    Returns:
        `PositionInterpolation`: the plan; its factor is 1.0 when the target is within the model's context.

    Raises:
        `ValueError`: when the target is not a positive integer, the model has no RoPE, its RoPE type is not one
            this module extends, `rope_type` is unknown or would replace the model's own scaling, or, for RoPE per
            layer type, its sliding-window layers have no `sliding_window` or dynamic NTK is asked for.
    """
    check_target_context_length(target_context_length)
    config = _text_config(config)
    owner = type(config).__name__
    parameters = rope_parameters_of(config)
    if parameters is None:
        raise ValueError(
            f"{owner} has no rotary position embeddings (RoPE): it uses learned absolute positions or ALiBi, which "
            "position interpolation cannot extend. Pass target_context_length=None (LoRA+ and S2-Attn still apply) "
            "or choose a RoPE model."
        )
    _check_rope_type_fits(rope_type, parameters, owner)
    max_positions = config.max_position_embeddings
    current = context_length(config)
    if parameters.get("rope_type") == "linear" and "original_max_position_embeddings" not in parameters:
        warnings.warn(
            f"{owner} has linear RoPE scaling (factor {parameters.get('factor')}) and max_position_embeddings="
            f"{max_positions} without original_max_position_embeddings: read as the reference LongLoRA convention "
            f"(max_position_embeddings is the unscaled length), the model handles {current} tokens. If "
            f"{max_positions} already is the scaled context (as in some linear-scaled checkpoints), set "
            f"config.rope_parameters['original_max_position_embeddings'] = {int(max_positions / _factor(parameters))} "
            "before extending.",
            stacklevel=2,
        )
    if target_context_length <= current:
        return PositionInterpolation(current, target_context_length, 1.0, parameters, parameters, max_positions)
    step = float(math.ceil(target_context_length / current))
    if _is_per_layer_type(parameters):
        if getattr(config, "sliding_window", None) is None and SLIDING_LAYER_TYPE in parameters:
            raise ValueError(
                f"{owner} has RoPE for {SLIDING_LAYER_TYPE!r} layers but no sliding_window: cannot tell their reach."
            )
        if rope_type == "dynamic" or any((v or {}).get("rope_type") == "dynamic" for v in parameters.values()):
            raise ValueError(
                f"{owner} keeps RoPE per layer type, whose context is max_position_embeddings; dynamic NTK reads that "
                "same value as its unscaled length, so it would extend nothing. Leave rope_type unset (linear "
                "interpolation of the full-attention layers) or pass rope_type='yarn'."
            )
        extended = {
            layer: scheme
            if layer == SLIDING_LAYER_TYPE or scheme is None
            else _extend_scheme(scheme, step, current, max_positions, rope_type, flat=False)
            for layer, scheme in parameters.items()
        }
        new_max = int(current * step)
    else:
        extended = _extend_scheme(parameters, step, current, max_positions, rope_type, flat=True)
        new_max = max_positions if extended["rope_type"] == "dynamic" else int(current * step)
    return PositionInterpolation(current, target_context_length, step, parameters, extended, new_max)


def legacy_rope_parameters(config, target_context_length: int, rope_type: str) -> tuple[dict, int] | None:
    """The RoPE that longlora_hf 0.1.0 gave a model for `target_context_length` (None: it changed nothing), so
    adapters it saved, which record no `rope_parameters`, reload with the positions they were trained at. That
    rule read only a linear factor as existing scaling and wrote `rope_type` over any other scheme."""
    config = _text_config(config)
    parameters = rope_parameters_of(config) or {}
    existing = float(parameters.get("factor", 1.0)) if parameters.get("rope_type") == "linear" else 1.0
    current = int(parameters.get("original_max_position_embeddings", config.max_position_embeddings) * existing)
    if target_context_length <= current:
        return None
    step = float(math.ceil(target_context_length / current))
    factor, original = (existing * step, int(current / existing)) if rope_type == "linear" else (step, current)
    parameters.update(rope_type=rope_type, factor=factor, original_max_position_embeddings=original)
    return parameters, max(config.max_position_embeddings, target_context_length)


def apply_position_interpolation(
    model: torch.nn.Module, target_context_length: int, rope_type: str | None = None
) -> PositionInterpolation:
    """Extend the model's RoPE for `target_context_length` (in place) and return what was done.

    Args:
        model (`torch.nn.Module`):
            A transformers model; its config and rotary modules change when the target exceeds its context.
        target_context_length (`int`):
            The context to reach, in tokens.
        rope_type (`str`, *optional*):
            As for `plan_position_interpolation`.

    Returns:
        `PositionInterpolation`: the plan that was applied.

    Raises:
        `ValueError`: as `plan_position_interpolation`, or when the model has no rotary module to rebuild.
    """
    plan = plan_position_interpolation(model.config, target_context_length, rope_type)
    if plan.changes_the_model:
        set_rope_parameters(model, plan.rope_parameters, plan.max_position_embeddings)
    return plan


def set_rope_parameters(model: torch.nn.Module, rope_parameters: dict, max_position_embeddings: int) -> None:
    """Write `rope_parameters` and `max_position_embeddings` on the model's (text) config and rebuild every
    rotary module of that config from it.

    Args:
        model (`torch.nn.Module`):
            A transformers model, changed in place.
        rope_parameters (`dict`):
            The new `rope_parameters` (copied).
        max_position_embeddings (`int`):
            The new `max_position_embeddings`.

    Raises:
        `ValueError`: when the model has no rotary module (one with an `inv_freq` buffer) of that config.
    """
    config = _text_config(model.config)
    rotary = [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "rope_type")
        and getattr(module, "config", config) is config
        and any(buffer.endswith("inv_freq") for buffer, _ in module.named_buffers(recurse=False))
    ]
    if not rotary:
        raise ValueError(
            f"Found no rotary embedding module (one with `inv_freq`) in {type(model).__name__}: its layers use no "
            "RoPE (NoPE, as Granite-4's hybrids), so position interpolation has nothing to extend. Pass "
            "target_context_length=None (LoRA+ and S2-Attn still apply)."
        )
    config.rope_parameters = copy.deepcopy(rope_parameters)
    config.max_position_embeddings = max_position_embeddings
    for name, module in rotary:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = next(module.buffers()).device
        setattr(parent, attribute, type(module)(config=config).to(device))
