"""How LongLoRA is injected: position interpolation, LoRA on attention, LoRA+ modules, S2-Attn."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraModel
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, _set_trainable
from torch import nn

from ..attention import (
    S2_ATTN_IMPLEMENTATION,
    S2AttentionSettings,
    check_group_size,
    check_s2_compatible,
    use_s2_attention,
)
from ..attention.settings import CONFIG_ATTRIBUTE
from ..position_interpolation import (
    describe_rope,
    legacy_rope_parameters,
    plan_position_interpolation,
    rope_parameters_of,
    set_rope_parameters,
)
from .config import S2_SETTINGS_FIELDS, LongLoraConfig
from .tiled_mlp import tile_mlps, untile_mlps


def attention_projection_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers directly inside the attention modules (q/k/v/o, fused qkv, dense...).

    Attention modules are found by their class (`...Attention`), not by a list of names, so fused and
    unusual layouts are covered. A subclass of nn.Linear with a forward of its own (DeepSeek-V4's block-diagonal
    `o_a_proj`) is left out: LoRA adds x A^T B^T to x W^T, which is not what such a layer computes.
    """
    names = set()
    for module in model.modules():
        if module is model or not type(module).__name__.endswith("Attention"):
            continue
        # `base_layer`: a projection that already carries another adapter (`load_adapter`)
        names.update(
            name for name, child in module.named_children() if _plain_linear(getattr(child, "base_layer", child))
        )
    if not names:
        attention_like = {
            type(m).__name__: sorted({type(child).__name__ for child in m.children()})
            for m in model.modules()
            if m is not model and any(word in type(m).__name__.lower() for word in ("attn", "attention"))
        }
        found = "; ".join(
            f"{name} (holds {', '.join(kinds) or 'nothing'})" for name, kinds in sorted(attention_like.items())
        )
        linear = sorted({name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"Found no attention projections in {type(model).__name__}: no module class ending in 'Attention' "
            f"holds an nn.Linear. Attention-like classes found: {found or 'none'}; linear layers: {linear}. "
            "Pass target_modules=[...] naming the attention projections."
        )
    return sorted(names)


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear that computes x W^T + b, the layer LoRA adapts. A subclass a transformers model defines with
    a forward of its own is probed on one random row (Falcon's `FalconLinear` is a plain product written out;
    DeepSeek-V4's `DeepseekV4GroupedLinear` is block-diagonal over groups of the input). Quantized layers
    (bitsandbytes' Linear4bit) are nn.Linear subclasses too and are left to PEFT, which adapts them."""
    if not isinstance(module, nn.Linear):
        return False
    if type(module).forward is nn.Linear.forward or not type(module).__module__.startswith("transformers.models."):
        return True
    weight = module.weight
    if weight.is_meta:
        return True
    row = torch.randn(
        1,
        module.in_features,
        dtype=weight.dtype,
        device=weight.device,
        generator=torch.Generator(device=weight.device).manual_seed(0),
    )
    try:
        with torch.no_grad():
            got = module(row)
    except (RuntimeError, ValueError):
        return False
    expected = nn.functional.linear(row, weight, module.bias)
    return got.shape == expected.shape and bool(torch.allclose(got, expected, rtol=1e-3, atol=1e-3))


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module a PEFT wrapper stands for (`modules_to_save`, trainable tokens), else `module` itself."""
    return module.original_module if isinstance(module, AuxiliaryTrainingWrapper) else module


def is_input_embedding(model: nn.Module, module: nn.Module) -> bool:
    """True for `model`'s input embedding as the model itself names it (`get_input_embeddings()`), whatever
    its attribute name (`embed_tokens`, `wte`, `word_embeddings`, `w`...), also when PEFT wraps it. False for
    every module of a model that names none (its `get_input_embeddings` raises NotImplementedError).

    Args:
        model (`torch.nn.Module`):
            A transformers model (or one PEFT wraps).
        module (`torch.nn.Module`):
            One of its modules.

    Returns:
        `bool`: whether `module` is (or wraps) the model's input embedding.
    """
    try:
        embedding = model.get_input_embeddings()
    except NotImplementedError:
        return False
    return _unwrapped(module) is _unwrapped(embedding)


def is_normalization(module: nn.Module) -> bool:
    """Layer norms, RMS norms and group norms, built-in or architecture-specific (`LlamaRMSNorm`...), whatever
    their attribute name (`norm`, `ln_f`, `ln_1`...), also when PEFT wraps them.

    Args:
        module (`torch.nn.Module`):
            The module to classify: `nn.LayerNorm`, `nn.GroupNorm`, `nn.RMSNorm`, or a class whose name ends in
            "Norm" and that holds parameters of its own.

    Returns:
        `bool`: whether `module` is (or wraps) a normalization layer.
    """
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


@dataclass(frozen=True)
class BaseModelState:
    """What LongLoRA changes on the shared base model, as it was before the first LongLoRA adapter: the attention
    implementation, the RoPE settings and context of the (text) config, and the S2 settings stored on the configs.
    PEFT's adapter lifecycle (unload, delete_adapter, disable_adapter) knows only about adapter layers; the tuner
    puts these back with `restore`."""

    attn_implementation: str | None
    rope_parameters: dict | None
    max_position_embeddings: int | None
    s2_attention: tuple[dict | None, dict | None]
    """`config.s2_attention` of the model's config and of its text config (None: absent)."""

    @classmethod
    def of(cls, model: nn.Module) -> BaseModelState:
        text_config = model.config.get_text_config()
        return cls(
            model.config._attn_implementation,
            rope_parameters_of(model.config),
            getattr(text_config, "max_position_embeddings", None),
            tuple(copy.deepcopy(getattr(c, CONFIG_ATTRIBUTE, None)) for c in (model.config, text_config)),
        )

    def config(self, model: nn.Module):
        """A copy of `model.config` with this state's RoPE and context: what the base's config was."""
        config = copy.deepcopy(model.config)
        text_config = config.get_text_config()
        if self.rope_parameters is not None:
            text_config.rope_parameters = copy.deepcopy(self.rope_parameters)
        if self.max_position_embeddings is not None:
            text_config.max_position_embeddings = self.max_position_embeddings
        return config

    def restore(self, model: nn.Module) -> None:
        """Give `model` this state back (nothing is rebuilt where nothing changed)."""
        if self.rope_parameters is not None and (
            rope_parameters_of(model.config) != self.rope_parameters
            or model.config.get_text_config().max_position_embeddings != self.max_position_embeddings
        ):
            set_rope_parameters(model, self.rope_parameters, self.max_position_embeddings)
        for config, stored in zip((model.config, model.config.get_text_config()), self.s2_attention):
            if stored is None:
                config.__dict__.pop(CONFIG_ATTRIBUTE, None)
            else:
                setattr(config, CONFIG_ATTRIBUTE, copy.deepcopy(stored))
        if self.attn_implementation is not None and model.config._attn_implementation != self.attn_implementation:
            model.set_attn_implementation(self.attn_implementation)


class TiedOutputHead(nn.Module):
    """An adapter's output head tied to its trained input embedding: `x @ embedding.weight.T`, with no weight of
    its own. It reads the embedding's weight at each call, so the tie holds whatever replaces that parameter (a
    loader that assigns tensors: transformers' `load_adapter`, PEFT's `low_cpu_mem_usage=True`), and the adapter
    saves and loads the weight once, under the embedding's name.

    Args:
        embedding (`torch.nn.Module`):
            The adapter's trained input embedding (its `weight` is `[vocab, hidden]`); held, not registered as a
            submodule.
    """

    def __init__(self, embedding: nn.Module):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: its weight is saved under its own name
        self.register_parameter("bias", None)  # what nn.Linear(bias=False) has; read by fused heads (TRL's)

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden_states, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False, tied to the embedding"


class TiedModulesToSaveWrapper(ModulesToSaveWrapper):
    """`modules_to_save` of a module tied to the input embedding (a tied model's output head, `lm_head`) whose
    copy for an adapter is a `TiedOutputHead` of that adapter's trained embedding: nothing of it is saved (the
    adapter file holds the shared weight once, as `embed_tokens.weight`) and nothing is loaded into it.

    PEFT 0.21's `ensure_weight_tying` wraps the head in a plain `ModulesToSaveWrapper` whose copy shares the
    embedding copy's parameter: saved a second time (`lm_head.weight`, doubling the file of a vocabulary-dominated
    model), needed to load, and untied by any loader that assigns parameters. PEFT ties trainable tokens by
    reference the same way (`TrainableTokensWrapper` with a `tied_adapter`, which saves nothing either).

    Args:
        module_to_save (`torch.nn.Module`):
            The base model's tied module (the output head).
        adapter_name (`str`):
            The first adapter.
        tied_module (`torch.nn.Module`, *optional*):
            That adapter's trained input embedding; its copy of the head is then a `TiedOutputHead` of it.
    """

    def update(self, adapter_name, tied_module=None, **kwargs):
        if tied_module is not None and adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = TiedOutputHead(tied_module)
        super().update(adapter_name, tied_module=tied_module, **kwargs)

    def is_tied(self, adapter_name: str) -> bool:
        """Whether `adapter_name`'s copy is a `TiedOutputHead` (not one the adapter trains on its own)."""
        return adapter_name in self.modules_to_save and isinstance(self.modules_to_save[adapter_name], TiedOutputHead)

    def unload_and_optionally_merge_module(self, merge, safe_merge, adapter_names) -> nn.Module:
        """The unloaded head: for a tied adapter a `nn.Linear` sharing the trained embedding's parameter, so the
        merged model is tied as the base was."""
        module = super().unload_and_optionally_merge_module(merge, safe_merge, adapter_names)
        if isinstance(module, TiedOutputHead):
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            linear.weight = module.weight
            return linear
        return module


class LongLoraModel(LoraModel):
    """The PEFT tuner behind `LongLoraConfig`: LoRA's machinery, with LongLoRA's model changes first.

    Position interpolation and S2-Attn change the base model all adapters share, which PEFT's lifecycle does not
    know about. The tuner records the base as it was before its first adapter (`base_state`) and follows PEFT's
    documented behaviour on it: `unload()` and deleting the last LongLoRA adapter give that base back,
    `disable_adapter()` runs it, and every adapter of one model shares one position extension.

    PEFT builds it for peft_type "LONGLORA" (`get_peft_model`, `PeftModel.from_pretrained`, `load_adapter`).

    Args:
        model (`torch.nn.Module`):
            The base model.
        peft_config (`LongLoraConfig` or `dict[str, LongLoraConfig]`):
            The first adapter's config (or the configs by adapter name).
        adapter_name (`str`):
            The first adapter's name.
        low_cpu_mem_usage (`bool`, defaults to False), state_dict (*optional*):
            As for `peft.LoraModel`.
    """

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        # Called on creation and by `load_adapter`/`add_adapter` alike, so loading an adapter restores
        # the position interpolation it was trained with.
        if getattr(self, "base_state", None) is None:
            self.base_state = BaseModelState.of(model)
        prepare_model_for_longlora(model, self.peft_config[adapter_name], self.base_state)
        self._modules_to_tie = None
        super().inject_adapter(model, adapter_name, **kwargs)
        if self._modules_to_tie:
            # Set aside by `_add_modules_to_save_to_tie`: wrapped as PEFT would, by a wrapper that saves them once.
            _set_trainable(
                model,
                adapter_name,
                module_names=self._modules_to_tie,
                inference_mode=self.peft_config[adapter_name].inference_mode,
                wrapper_cls=TiedModulesToSaveWrapper,
                activate_adapter=adapter_name in self.active_adapters,
                tied_module=model.get_input_embeddings().modules_to_save[adapter_name],
            )
            self._modules_to_tie = None
        active = self.active_adapters[0] if len(self.active_adapters) == 1 else None
        if active not in (None, adapter_name) and isinstance(self.peft_config.get(active), LongLoraConfig):
            apply_attention(model, self.peft_config[active])  # an added adapter is not active: keep the active one's

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate an adapter, and the attention it trains with (its S2 settings, or none)."""
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) == 1 and isinstance(self.peft_config.get(names[0]), LongLoraConfig):
            apply_attention(self.model, self.peft_config[names[0]])

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is not None and not self.training:
            norms = sorted(
                {name for name in adapter_names if getattr(self.peft_config.get(name), "trainable_norms", False)}
            )
            if norms:
                raise ValueError(
                    f"A batch that mixes adapters (adapter_names) cannot run LongLoRA adapters that train the "
                    f"normalization layers ({', '.join(norms)}: trainable_norms=True, LoRA+): PEFT mixes adapters per "
                    "row only in Linear, Embedding and Conv layers. Run each adapter's rows in a call of their own "
                    "(model.set_adapter(name)), or merge each adapter into a model of its own (merge_and_unload)."
                )
        with super()._enable_peft_forward_hooks(*args, **kwargs):
            yield

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, *args, **kwargs
    ) -> None:
        """PEFT's weighted combination of LoRA adapters, for LongLoRA adapters without LoRA+ modules (the trained
        embeddings and norms are whole weights, which PEFT's combinations do not weigh)."""
        lora_plus = [name for name in adapters if getattr(self.peft_config.get(name), "modules_to_save", None)]
        if lora_plus:
            raise ValueError(
                f"add_weighted_adapter combines LoRA factors only, but the LongLoRA adapters {lora_plus} also train "
                "whole modules (LoRA+: the embeddings and norms, modules_to_save), which PEFT cannot weigh. Combine "
                "adapters trained with trainable_embeddings=False and trainable_norms=False, or merge the adapters "
                "one at a time into the base (merge_and_unload) instead."
            )
        super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)

    def _add_modules_to_save_to_tie(self, peft_config, tied_weight_keys) -> None:
        """PEFT's choice of the modules tied to a trained input embedding (`ensure_weight_tying`), wrapped by
        `inject_adapter` in `TiedModulesToSaveWrapper` (saved once, under the embedding's name) instead of PEFT's
        `ModulesToSaveWrapper` (saved twice). A module some other adapter already trains on its own (a plain
        wrapper) is left to PEFT."""
        super()._add_modules_to_save_to_tie(peft_config, tied_weight_keys)
        modules = dict(self.model.named_modules())
        names = sorted(peft_config.modules_to_tie or ())
        plain = [
            name
            for name in names
            if isinstance(modules.get(name), AuxiliaryTrainingWrapper)
            and not isinstance(modules[name], TiedModulesToSaveWrapper)
        ]
        if names and not plain:
            self._modules_to_tie, peft_config.modules_to_tie = names, None

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's key mapping, less the copy of a tied module that adapters saved before `TiedModulesToSaveWrapper`
        (`lm_head.weight` beside `embed_tokens.weight`): the tied copy is the embedding's, loaded under its name."""
        for name, module in model.named_modules():
            if isinstance(module, TiedModulesToSaveWrapper) and module.is_tied(adapter_name):
                for saved in (f"{name}.weight", f"{ADAPTER_PREFIX}{name}.weight"):
                    state_dict.pop(saved, None)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def _get_module_names_tied_with_embedding(self) -> list[str]:
        names = super()._get_module_names_tied_with_embedding()
        embedding = self.model.get_input_embeddings()
        if names or not isinstance(embedding, AuxiliaryTrainingWrapper):
            return names
        # PEFT 0.21 finds no tie once an adapter's `modules_to_save` wraps the embedding (its parameters are renamed
        # `original_module.` / `modules_to_save.<name>.`), so a second adapter would train an embedding its output
        # head does not share. Read the ties from the model's own `_tied_weights_keys` instead.
        if getattr(self.model.config.get_text_config(), "tie_word_embeddings", None) is False:
            return []
        embedding_name = next(name for name, module in self.model.named_modules() if module is embedding)
        tied = getattr(self.model, "_tied_weights_keys", None)
        return sorted(
            {
                target.rpartition(".")[0]
                for target, source in (tied if isinstance(tied, dict) else {}).items()
                if source == f"{embedding_name}.weight"
            }
        )

    def merge_and_unload(self, *args, **kwargs) -> torch.nn.Module:
        """Merge LoRA and the LoRA+ modules into a plain transformers model with dense attention, keeping the
        position extension the adapters were trained with (the merged model is the long-context model)."""
        model = super().merge_and_unload(*args, **kwargs)
        untile_mlps(model)
        if model.config._attn_implementation == S2_ATTN_IMPLEMENTATION:
            leave_s2_attention(model)
        for config in {
            id(model.config): model.config,
            id(model.config.get_text_config()): model.config.get_text_config(),
        }.values():
            if hasattr(config, CONFIG_ATTRIBUTE):
                del config.s2_attention
        return model

    def unload(self) -> torch.nn.Module:
        """Return the base model by removing all the PEFT modules and LongLoRA's changes to it (its attention
        implementation, RoPE, context and config fields), as it was before the first adapter."""
        # PEFT's unload keeps the trained copy of each `modules_to_save` module; LoRA+'s embeddings and norms are
        # adapter weights, so the base gets its own modules back.
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent_name, _, attribute = name.rpartition(".")
                setattr(
                    self.model.get_submodule(parent_name) if parent_name else self.model,
                    attribute,
                    module.original_module,
                )
        model = super().unload()
        untile_mlps(model)
        self.base_state.restore(model)
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; deleting the last LongLoRA adapter gives the base model its own state back."""
        super().delete_adapter(adapter_name)
        if not any(isinstance(config, LongLoraConfig) for config in self.peft_config.values()):
            untile_mlps(self.model)
            self.base_state.restore(self.model)

    def disable_adapter_layers(self) -> None:
        """Run the base model (PeftModel.disable_adapter): its own RoPE and attention, besides PEFT's switch."""
        super().disable_adapter_layers()
        if getattr(self, "_adapter_state", None) is None:
            self._adapter_state = BaseModelState.of(self.model)
            self.base_state.restore(self.model)

    def enable_adapter_layers(self) -> None:
        """Undo `disable_adapter_layers`: the adapters' RoPE and attention are back."""
        super().enable_adapter_layers()
        if getattr(self, "_adapter_state", None) is not None:
            state, self._adapter_state = self._adapter_state, None
            state.restore(self.model)


def tied_head_weights(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """What PEFT's own `ModulesToSaveWrapper` would save of `adapter_name`'s output heads tied to its embedding
    (`TiedModulesToSaveWrapper`), which a LongLoRA adapter leaves out: `{"base_model.model.lm_head.weight": the
    trained embedding}`, keyed as in `model.save_pretrained`. Vanilla PEFT needs them to load the adapter."""
    return {
        f"{name}.weight": module.modules_to_save[adapter_name].weight
        for name, module in model.named_modules()
        if isinstance(module, TiedModulesToSaveWrapper) and module.is_tied(adapter_name)
    }


def leave_s2_attention(model: nn.Module) -> None:
    """Switch a model from "s2" to its inner kernel (dense attention, as "s2" computes outside training)."""
    model.set_attn_implementation(S2AttentionSettings.from_config(model.config).inner_attn_implementation)


def prepare_model_for_longlora(model: nn.Module, config: LongLoraConfig, base: BaseModelState | None = None) -> None:
    """Apply a LongLoraConfig's changes to the base model and fill in what it resolves per architecture.

    `base`: the model as it was before any LongLoRA adapter (default: as it is now). A new adapter's position
    extension is planned from it, so that a second adapter of a model records the base's RoPE as its original,
    and one that would extend the positions otherwise than the adapters already there is refused.

    Args:
        model (`torch.nn.Module`):
            The base model (not a `PeftModel`), changed in place: its RoPE and `max_position_embeddings` when
            `config.target_context_length` exceeds its context, and its attention (S2-Attn to train, else the inner
            kernel).
        config (`LongLoraConfig`):
            The adapter's config, filled in place: `target_modules` (when unset), `modules_to_save` (the LoRA+
            modules), `ensure_weight_tying` when a tied embedding trains, a relative local
            `base_model_name_or_path` made absolute, and the RoPE it records.
        base (`BaseModelState`, *optional*):
            As above.

    Raises:
        `ValueError`: when `model` is already a `PeftModel`, S2-Attn cannot run on it (`check_s2_compatible`) or
            its groups at `target_context_length` would be under 2 tokens, or the positions cannot be extended as
            asked (no RoPE, a `rope_type` that would replace the model's own scaling, an adapter whose RoPE
            differs from the other adapters' or from the base's).
    """
    if isinstance(model, PeftModel):
        raise ValueError(
            f"The model is already a PEFT model ({type(model).__name__} with adapters "
            f"{sorted(model.peft_config)}): LongLoRA goes on the base model. Call get_peft_model on "
            "model.get_base_model() (or the model before get_peft_model), or add LongLoRA as another adapter "
            "with model.add_adapter(name, LongLoraConfig(...))."
        )
    base_path = config.base_model_name_or_path
    if base_path and not Path(base_path).is_absolute() and Path(base_path).is_dir():
        # A base loaded from a relative directory (`longlora_hf/demo/assets`): recorded as it was given, the
        # adapter would load only from the directory it was trained in.
        config.base_model_name_or_path = str(Path(base_path).resolve())
    train_s2 = config.use_s2_attn and not config.inference_mode
    if train_s2:
        check_s2_compatible(model)  # before anything changes the model
        if config.target_context_length is not None:  # the length it trains for: groups under 2 tokens refused now
            settings = config.s2_attention_settings()
            check_group_size(
                config.target_context_length, settings.group_size_for(config.target_context_length), settings
            )
    if config.target_modules is None:
        config.target_modules = set(attention_projection_names(model))
    trainable = lora_plus_module_names(model, config.trainable_embeddings, config.trainable_norms)
    config.modules_to_save = sorted(set(config.modules_to_save or []) | set(trainable))
    if config.trainable_embeddings and getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        config.ensure_weight_tying = True

    if config.target_context_length is not None:
        extend_positions(model, config, base or BaseModelState.of(model))
    apply_attention(model, config)
    if config.mlp_tile_size is not None and not config.inference_mode:
        tile_mlps(model, config.mlp_tile_size)


def apply_attention(model: nn.Module, config: LongLoraConfig) -> None:
    """Give `model` the attention `config` trains with: S2-Attn with its settings, or the inner kernel."""
    if config.use_s2_attn and not config.inference_mode:
        use_s2_attention(model, **{name: getattr(config, name) for name in S2_SETTINGS_FIELDS})
    elif model.config._attn_implementation == S2_ATTN_IMPLEMENTATION:
        leave_s2_attention(model)


def extend_positions(model: nn.Module, config: LongLoraConfig, base: BaseModelState) -> None:
    """Give the base model the RoPE of `config.target_context_length` and record it in `config`.

    `base` is the model before any LongLoRA adapter. A new config records the plan made from it (RoPE before and
    after, the context before, the factor). A config loaded with an adapter, or one used before, restores exactly
    the RoPE it recorded, on a base whose RoPE is the recorded original. All adapters of one model share its RoPE,
    so an adapter whose extension differs from the one in force is refused: its weights were trained for other
    positions, and switching would move the others'.
    """
    now = rope_parameters_of(model.config)
    if config.rope_parameters is None and config.position_interpolation_factor is not None:
        # saved by longlora_hf 0.1.0, which recorded the factor but not the RoPE: reload what that version did
        legacy = legacy_rope_parameters(model.config, config.target_context_length, config.rope_type or "linear")
        if legacy is not None:
            set_rope_parameters(model, *legacy)
        return
    plan = plan_position_interpolation(base.config(model), config.target_context_length, config.rope_type)
    if (
        config.original_rope_parameters is not None
        and plan.original_rope_parameters != config.original_rope_parameters
    ):
        raise ValueError(
            f"This adapter was trained over RoPE {describe_rope(config.original_rope_parameters)} extended to "
            f"{describe_rope(config.rope_parameters)}, but the base model has {describe_rope(base.rope_parameters)}. "
            "Load it on the base model it was trained from (its base_model_name_or_path)."
        )
    wanted = plan.rope_parameters if config.rope_parameters is None else config.rope_parameters
    if now != base.rope_parameters and now != wanted:
        raise ValueError(
            f"This adapter extends the positions of RoPE {describe_rope(base.rope_parameters)} to "
            f"{describe_rope(wanted)}, but the model's other LongLoRA adapters run it extended to "
            f"{describe_rope(now)}: adapters of one model share its RoPE, so each would run at positions it was not "
            f"trained for. Give it the same target_context_length (and rope_type) as the others, load it on a base "
            "model of its own, or delete the other adapters (or unload()) first."
        )
    if config.rope_parameters is None:
        config.original_context_length = plan.original_context_length
        config.position_interpolation_factor = plan.factor
        config.original_rope_parameters = plan.original_rope_parameters
        config.rope_parameters = plan.rope_parameters
    if now != config.rope_parameters:
        set_rope_parameters(model, config.rope_parameters, plan.max_position_embeddings)


ADAPTER_PREFIX = "base_model.model."  # how PEFT names a saved adapter's tensors: prefix + the base's own name


def check_adapter_weights(shapes: dict[str, tuple[int, ...]], model: nn.Module, where: str) -> None:
    """Refuse adapter tensors (name -> shape, as saved) that do not fit `model` (a base model, not wrapped):
    a LoRA factor (`<module>.lora_A/lora_B...`) of a module the base does not have, or of another width; any
    other tensor (a LoRA+ embedding or norm) that is not a weight of the base, or has another shape.
    `where` names the base in the messages.

    Args:
        shapes (`dict[str, tuple[int, ...]]`):
            The adapter's tensors, by name as saved (`base_model.model.` + the base's own name), with their shapes.
        model (`torch.nn.Module`):
            The base model.
        where (`str`):
            How the messages name the base.

    Raises:
        `ValueError`: at the first tensor that does not fit, saying which and why.
    """
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
    those layers untrained, silently). A Hub id is left to PEFT. Reads the config and the safetensors header.

    Args:
        model (`torch.nn.Module`):
            The base model; a `PeftModel` is left to PEFT.
        adapter (`str` or `Path`):
            The adapter: a local directory holding `adapter_model.safetensors` is checked, anything else is not.
        flag (`str`, defaults to "--adapter"):
            The option that named the adapter, which the message starts with.

    Raises:
        `ValueError`: when the adapter does not fit the base (`check_adapter_weights`), or misses LoRA weights of
            linear layers its `target_modules` name (unless it targets parameters).
    """
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
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and check_target_module_exists(config, name)
        ]
        missing = [name for name in targeted if name not in saved]
        if saved and missing:
            raise ValueError(
                f"the adapter has no LoRA weights for {len(missing)} of the {len(targeted)} linear layers of {where} "
                f"that its target_modules name (first: {missing[0]}): it was made for a model with fewer layers. Use "
                "the base it was trained on."
            )
    except ValueError as error:
        raise ValueError(f"{flag} {adapter}: {error}") from None
