"""Which models S2-Attn can run on: the checks that refuse the others, with the way to train them without it."""

from __future__ import annotations

import inspect

import torch

from .s2 import WITHOUT_S2, check_causal


def dispatches_through_the_registry(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention reaches the function registered for its `attn_implementation`: declared by the
    class (`_supports_attention_backend`), or, for hybrids that leave it unset (Qwen3-Next: linear-attention layers
    beside full-attention ones), read from the source of its attention modules, which look the function up in
    `ALL_ATTENTION_FUNCTIONS`. Layers that do not (linear attention, Mamba) train as they are.

    Args:
        model (`torch.nn.Module`):
            A transformers model (its weights are not read: a model on the meta device will do).

    Returns:
        `bool`: True when `attn_implementation="s2"` would reach the model's attention.
    """
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
    """Raise a clear error when S2-Attn cannot run on `model`.

    Args:
        model (`torch.nn.Module`):
            A transformers causal LM (its weights are not read: a model on the meta device will do).

    Raises:
        `ValueError`: when the model does not dispatch attention through transformers' registry
            (`dispatches_through_the_registry`), selects its keys with an indexer (DeepSeek sparse attention),
            has only non-causal attention layers (an encoder), or soft-caps its attention logits. Each message
            says how to train the model without S2-Attn.
    """
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
    class (remote code) is checked when the model is loaded.

    Args:
        config (`transformers.PreTrainedConfig`):
            The config of the model to be trained with S2-Attn.

    Raises:
        `ValueError`: as `check_s2_compatible`, when S2-Attn cannot run on the model `config` describes.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        return
    with torch.device("meta"):
        model = model_class(config)
    check_s2_compatible(model)
