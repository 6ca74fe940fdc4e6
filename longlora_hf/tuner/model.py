"""How LongLoRA is injected: position interpolation, LoRA on attention, LoRA+ modules, S2-Attn."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraModel
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..attention import S2_ATTN_IMPLEMENTATION, S2AttentionSettings, check_group_size, check_s2_compatible, use_s2_attention
from .config import S2_SETTINGS_FIELDS, LongLoraConfig
from ..position_interpolation import (
    describe_rope,
    legacy_rope_parameters,
    plan_position_interpolation,
    rope_parameters_of,
    set_rope_parameters,
)


def attention_projection_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers directly inside the attention modules (q/k/v/o, fused qkv, dense...).

    Attention modules are found by their class (`...Attention`), not by a list of names, so fused and
    unusual layouts are covered.
    """
    names = set()
    for module in model.modules():
        if module is model or not type(module).__name__.endswith("Attention"):
            continue
        # `base_layer`: a projection that already carries another adapter (`load_adapter`)
        names.update(
            name for name, child in module.named_children() if isinstance(getattr(child, "base_layer", child), nn.Linear)
        )
    if not names:
        attention_like = {
            type(m).__name__: sorted({type(child).__name__ for child in m.children()})
            for m in model.modules()
            if m is not model and any(word in type(m).__name__.lower() for word in ("attn", "attention"))
        }
        found = "; ".join(f"{name} (holds {', '.join(kinds) or 'nothing'})" for name, kinds in sorted(attention_like.items()))
        linear = sorted({name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"Found no attention projections in {type(model).__name__}: no module class ending in 'Attention' "
            f"holds an nn.Linear. Attention-like classes found: {found or 'none'}; linear layers: {linear}. "
            "Pass target_modules=[...] naming the attention projections."
        )
    return sorted(names)


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module a PEFT wrapper stands for (`modules_to_save`, trainable tokens), else `module` itself."""
    return module.original_module if isinstance(module, AuxiliaryTrainingWrapper) else module


def is_input_embedding(model: nn.Module, module: nn.Module) -> bool:
    """True for `model`'s input embedding as the model itself names it (`get_input_embeddings()`), whatever
    its attribute name (`embed_tokens`, `wte`, `word_embeddings`, `w`...), also when PEFT wraps it. False for
    every module of a model that names none (its `get_input_embeddings` raises NotImplementedError)."""
    try:
        embedding = model.get_input_embeddings()
    except NotImplementedError:
        return False
    return _unwrapped(module) is _unwrapped(embedding)


def is_normalization(module: nn.Module) -> bool:
    """Layer norms, RMS norms and group norms, built-in or architecture-specific (`LlamaRMSNorm`...), whatever
    their attribute name (`norm`, `ln_f`, `ln_1`...), also when PEFT wraps them."""
    module = _unwrapped(module)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith("Norm") and any(True for _ in module.parameters(recurse=False))


def lora_plus_module_names(model: nn.Module, embeddings: bool, norms: bool) -> list[str]:
    """Leaf names of the modules LoRA+ trains: the input embedding and every normalization layer.

    Leaf names keep the adapter config short and portable; they are used only when every module with
    that leaf name is one LoRA+ trains, full names otherwise.
    """
    # A module another adapter already saves is wrapped by PEFT: look at the wrapper, not inside it.
    modules, wrapped = {}, ()
    for name, module in model.named_modules():
        if wrapped and name.startswith(wrapped):
            continue
        modules[name] = module
        if isinstance(module, AuxiliaryTrainingWrapper):
            wrapped = name + "."
    wanted = {
        name
        for name, module in modules.items()
        if (embeddings and is_input_embedding(model, module)) or (norms and is_normalization(module))
    }
    leaves = {}
    for name in modules:
        leaves.setdefault(name.rpartition(".")[2], []).append(name)
    result = set()
    for name in wanted:
        leaf = name.rpartition(".")[2]
        result.add(leaf if all(other in wanted for other in leaves[leaf]) else name)
    return sorted(result)


class LongLoraModel(LoraModel):
    """The PEFT tuner behind `LongLoraConfig`: LoRA's machinery, with LongLoRA's model changes first."""

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        # Called on creation and by `load_adapter`/`add_adapter` alike, so loading an adapter restores
        # the position interpolation it was trained with.
        prepare_model_for_longlora(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, **kwargs)

    def merge_and_unload(self, *args, **kwargs) -> torch.nn.Module:
        """Merge LoRA and the LoRA+ modules into a plain transformers model with dense attention."""
        model = super().merge_and_unload(*args, **kwargs)
        if model.config._attn_implementation == S2_ATTN_IMPLEMENTATION:
            leave_s2_attention(model)
        for config in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
            if hasattr(config, "s2_attention"):
                del config.s2_attention
        return model


def leave_s2_attention(model: nn.Module) -> None:
    """Switch a model from "s2" to its inner kernel (dense attention, as "s2" computes outside training)."""
    model.set_attn_implementation(S2AttentionSettings.from_config(model.config).inner_attn_implementation)


def prepare_model_for_longlora(model: nn.Module, config: LongLoraConfig) -> None:
    """Apply a LongLoraConfig's changes to the base model and fill in what it resolves per architecture."""
    if isinstance(model, PeftModel):
        raise ValueError(
            f"The model is already a PEFT model ({type(model).__name__} with adapters "
            f"{sorted(model.peft_config)}): LongLoRA goes on the base model. Call get_peft_model on "
            "model.get_base_model() (or the model before get_peft_model), or add LongLoRA as another adapter "
            "with model.add_adapter(name, LongLoraConfig(...))."
        )
    base = config.base_model_name_or_path
    if base and not Path(base).is_absolute() and Path(base).is_dir():
        # A base loaded from a relative directory (`longlora_hf/demo/assets`): recorded as it was given, the
        # adapter would load only from the directory it was trained in.
        config.base_model_name_or_path = str(Path(base).resolve())
    train_s2 = config.use_s2_attn and not config.inference_mode
    if train_s2:
        check_s2_compatible(model)  # before anything changes the model
        if config.target_context_length is not None:  # the length it trains for: groups under 2 tokens refused now
            settings = config.s2_attention_settings()
            check_group_size(config.target_context_length, settings.group_size_for(config.target_context_length), settings)
    if config.target_modules is None:
        config.target_modules = set(attention_projection_names(model))
    trainable = lora_plus_module_names(model, config.trainable_embeddings, config.trainable_norms)
    config.modules_to_save = sorted(set(config.modules_to_save or []) | set(trainable))
    if config.trainable_embeddings and getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        config.ensure_weight_tying = True

    if config.target_context_length is not None:
        extend_positions(model, config)
    if train_s2:
        use_s2_attention(model, **{name: getattr(config, name) for name in S2_SETTINGS_FIELDS})
    elif model.config._attn_implementation == S2_ATTN_IMPLEMENTATION:
        leave_s2_attention(model)


def extend_positions(model: nn.Module, config: LongLoraConfig) -> None:
    """Give the base model the RoPE of `config.target_context_length` and record it in `config`.

    A new config records the plan (RoPE before and after, the context before, the factor). A config loaded
    with an adapter restores exactly the RoPE it recorded, on a base whose RoPE is the recorded original
    (or already the recorded result: a second adapter of the same extension); any other base is refused,
    since the adapter's weights were trained for other positions.
    """
    now = rope_parameters_of(model.config)
    if config.rope_parameters is not None and now == config.rope_parameters:
        return
    if config.rope_parameters is None and config.position_interpolation_factor is not None:
        # saved by longlora_hf 0.1.0, which recorded the factor but not the RoPE: reload what that version did
        legacy = legacy_rope_parameters(model.config, config.target_context_length, config.rope_type or "linear")
        if legacy is not None:
            set_rope_parameters(model, *legacy)
        return
    plan = plan_position_interpolation(model.config, config.target_context_length, config.rope_type)
    if config.original_rope_parameters is not None and plan.original_rope_parameters != config.original_rope_parameters:
        raise ValueError(
            f"This adapter was trained over RoPE {describe_rope(config.original_rope_parameters)} extended to "
            f"{describe_rope(config.rope_parameters)}, but the base model has {describe_rope(now)}. Load it on the base "
            "model it was trained from (its base_model_name_or_path), or unload the adapter that changed the RoPE first."
        )
    if config.rope_parameters is None:
        config.original_context_length = plan.original_context_length
        config.position_interpolation_factor = plan.factor
        config.original_rope_parameters = plan.original_rope_parameters
        config.rope_parameters = plan.rope_parameters
    if plan.changes_the_model or config.rope_parameters != plan.original_rope_parameters:
        set_rope_parameters(model, config.rope_parameters, plan.max_position_embeddings)


ADAPTER_PREFIX = "base_model.model."  # how PEFT names a saved adapter's tensors: prefix + the base's own name


def check_adapter_weights(shapes: dict[str, tuple[int, ...]], model: nn.Module, where: str) -> None:
    """Refuse adapter tensors (name -> shape, as saved) that do not fit `model` (a base model, not wrapped):
    a LoRA factor (`<module>.lora_A/lora_B...`) of a module the base does not have, or of another width; any
    other tensor (a LoRA+ embedding or norm) that is not a weight of the base, or has another shape.
    `where` names the base in the messages."""
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for name, shape in shapes.items():
        key = name.removeprefix(ADAPTER_PREFIX)
        module_name, lora, rest = key.partition(".lora_")
        if lora:
            if module_name not in modules:
                raise ValueError(
                    f"adapter weight {name} belongs to {module_name}, which is not a module of {where}: the adapter "
                    "was made for another model (more layers, or other module names). Use the base it was trained on."
                )
            module, factor = modules[module_name], rest.partition(".")[0]
            if isinstance(module, nn.Linear) and factor in ("A", "B"):
                wanted = (shape[0], module.in_features) if factor == "A" else (module.out_features, shape[1])
                if tuple(shape) != wanted:
                    raise ValueError(
                        f"adapter weight {name} has shape {tuple(shape)}; {module_name} in {where} needs {wanted}: "
                        "the adapter was made for a model of another width. Use the base it was trained on."
                    )
            continue
        if key not in parameters:
            raise ValueError(
                f"adapter weight {name} is not a weight of {where}: the adapter was made for another model. "
                "Use the base it was trained on."
            )
        if tuple(parameters[key].shape) != tuple(shape):
            raise ValueError(
                f"adapter weight {name} has shape {tuple(shape)}; {where} has {tuple(parameters[key].shape)}: the "
                "adapter was made for another model. Use the base it was trained on."
            )


def check_adapter_fits(model: nn.Module, adapter: str | Path, flag: str = "--adapter") -> None:
    """Before loading the local adapter directory `adapter` on `model` (a base, not wrapped): every tensor it
    saved fits the base (`check_adapter_weights`), and every linear layer of the base its config targets has
    LoRA weights in it (else the adapter was made for a model with fewer layers: PEFT would load it and leave
    those layers untrained, silently). A Hub id is left to PEFT. Reads the config and the safetensors header."""
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from safetensors import safe_open

    path = Path(adapter).expanduser()
    weights = path / "adapter_model.safetensors"
    if isinstance(model, PeftModel) or not weights.is_file():
        return
    with safe_open(str(weights), framework="pt") as handle:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    where = f"the base model ({type(model).__name__}, {getattr(model.config, 'name_or_path', '') or 'given'})"
    try:
        check_adapter_weights(shapes, model, where)
        config = PeftConfig.from_pretrained(str(path))
        if getattr(config, "target_parameters", None):
            return
        saved = {name.removeprefix(ADAPTER_PREFIX).partition(".lora_")[0] for name in shapes if ".lora_" in name}
        targeted = [
            name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and check_target_module_exists(config, name)
        ]
        missing = [name for name in targeted if name not in saved]
        if saved and missing:
            raise ValueError(
                f"the adapter has no LoRA weights for {len(missing)} of the {len(targeted)} linear layers of {where} that its "
                f"target_modules name (first: {missing[0]}): it was made for a model with fewer layers. Use the base "
                "it was trained on."
            )
    except ValueError as error:
        raise ValueError(f"{flag} {adapter}: {error}") from None
