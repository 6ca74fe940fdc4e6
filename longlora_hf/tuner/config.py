"""`LongLoraConfig`: LoRA+ with S2-Attn and position interpolation, as a PEFT config."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from peft import LoraConfig
from peft.utils import PeftType

from ..attention import S2AttentionSettings, inner_attn_implementation_for, s2_field
from ..model_card import write_model_card
from ..position_interpolation import check_rope_type, check_target_context_length
from .tiled_mlp import check_mlp_tile_size


S2_SETTINGS_FIELDS = tuple(f.name for f in fields(S2AttentionSettings))
"""The S2-Attn settings, fields of LongLoraConfig too (defined once, in S2AttentionSettings)."""

PEFT_TYPE = "LONGLORA"


@dataclass
class LongLoraConfig(LoraConfig):
    """LongLoRA (Chen et al., ICLR 2024): LoRA on the attention projections, plus trainable embeddings and
    normalization layers ("LoRA+", paper Section 3.3), trained with shifted sparse attention (S2-Attn,
    Section 3.2) at a context extended by position interpolation.

    `get_peft_model(model, LongLoraConfig(target_context_length=32768))`:
    1. extends the model's own RoPE scheme by `s = ceil(target / current context)` when the target exceeds the
       context the model already handles (plain RoPE: linear position interpolation, the reference code's
       rule; llama3/yarn/dynamic/linear: their factor grows; longrope: its long factors; Gemma 3: the
       full-attention layers), and raises `max_position_embeddings`; the RoPE before and after are recorded
       here and restored exactly whenever the adapter is loaded;
    2. puts LoRA on the attention projections, found per architecture (`q_proj/k_proj/v_proj/o_proj`,
       fused `query_key_value`/`qkv_proj` and `dense`, ...) unless `target_modules` is given;
    3. makes the input embedding and every normalization layer trainable and saved with the adapter
       (`modules_to_save`), found by module type, so architectures nobody listed work too; tied
       input/output embeddings stay tied;
    4. switches the model to `attn_implementation="s2"` with the S2 settings here (group size, shift, and the
       inner kernel: by default the attention the model was loaded with, so `flash_attention_2` stays flash).

    A model loaded for inference (`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`) gets the
    position interpolation back and runs dense attention. Defaults are the paper's.

    The fields are the arguments: `peft.LoraConfig`'s, and LongLoRA's below, each documented by its
    `metadata["help"]` (the S2-Attn ones are `S2AttentionSettings`'s). `original_context_length`,
    `position_interpolation_factor`, `original_rope_parameters` and `rope_parameters` are recorded by
    `get_peft_model`, not set by hand.

    Raises:
        `ValueError`: on construction, when `target_context_length`, `rope_type` or an S2-Attn setting is invalid
            (besides `LoraConfig`'s own checks).
    """

    r: int = field(default=8, metadata={"help": "LoRA rank. The paper uses 8."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha. The paper uses 16."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input. The paper uses none."})
    task_type: str = field(default="CAUSAL_LM", metadata={"help": "Always CAUSAL_LM: LongLoRA extends decoders."})
    target_context_length: int | None = field(
        default=None,
        metadata={
            "help": "The context length to train for, in tokens. When it exceeds the context the model already "
            "handles (Llama-3.1: 131072, not the 8192 its llama3 RoPE scaling started from), the model's own RoPE "
            "scheme is extended by s = ceil(target / current context): plain RoPE by linear position interpolation "
            "(the paper's), linear/llama3/yarn/dynamic by growing their factor, longrope by scaling its long factors, "
            "per-layer-type RoPE (Gemma 3) on its full-attention layers. At or below it nothing changes. None keeps "
            "the model's positions. README: 'Position extension, scheme by scheme'."
        },
    )
    rope_type: str | None = field(
        default=None,
        metadata={
            "help": "None (default): extend the model's own RoPE scheme. On a model with plain RoPE, 'linear' (the "
            "paper's), 'dynamic' (NTK) or 'yarn' choose the extension; on a model whose RoPE is already scaled, a "
            "type other than its own is refused, since it would replace that scaling."
        },
    )
    use_s2_attn: bool = field(
        default=True,
        metadata={
            "help": "Train with shifted sparse attention (attn_implementation='s2'). Inference is always dense."
        },
    )
    group_size_ratio: float = s2_field("group_size_ratio")
    group_size: int | None = s2_field("group_size")
    shift: bool = s2_field("shift")
    inner_attn_implementation: str | None = s2_field(
        "inner_attn_implementation",
        default=None,
        help_prefix="None (default): the attention the model was loaded with, 'flash_attention_2' staying flash-attn "
        "and anything else 'sdpa'. ",
    )
    mlp_tile_size: int | None = field(
        default=None,
        metadata={
            "help": "Run each decoder layer's dense MLP in tiles of this many tokens while training, each tile "
            "recomputed in the backward pass, so the MLP's intermediate activations exist for one tile at a time "
            "(memory for long sequences; gradients unchanged). None (default): untiled. Mixture-of-experts blocks "
            "are not tiled. docs/memory.md."
        },
    )
    trainable_embeddings: bool = field(
        default=True,
        metadata={"help": "Train and save the input embedding (LoRA+). Paper Table 3: needed for long context."},
    )
    trainable_norms: bool = field(
        default=True,
        metadata={"help": "Train and save every normalization layer (LoRA+). Paper Table 3: needed for long context."},
    )
    original_context_length: int | None = field(
        default=None,
        metadata={
            "help": "Recorded by get_peft_model: the context the base model handled before (its current context)."
        },
    )
    position_interpolation_factor: float | None = field(
        default=None,
        metadata={
            "help": "Recorded by get_peft_model: the extension s over the base model's own RoPE scheme (1.0: none)."
        },
    )
    original_rope_parameters: dict | None = field(
        default=None,
        metadata={"help": "Recorded by get_peft_model: the base model's rope_parameters before the extension."},
    )
    rope_parameters: dict | None = field(
        default=None,
        metadata={
            "help": "Recorded by get_peft_model: the rope_parameters the adapter was trained with; loading the "
            "adapter restores exactly these, and refuses a base whose RoPE is not the recorded original."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType(PEFT_TYPE)
        if self.target_context_length is not None:
            check_target_context_length(self.target_context_length)
        check_rope_type(self.rope_type)
        check_mlp_tile_size(self.mlp_tile_size)
        self.s2_attention_settings()  # validates every S2 field

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save the config, and the LongLoRA model card as README.md in place of PEFT's generic one
        (a card someone wrote is kept).

        Args:
            save_directory (`str`):
                The directory to write `adapter_config.json` and README.md to.
            **kwargs:
                Passed on to `peft.PeftConfig.save_pretrained`.
        """
        super().save_pretrained(save_directory, **kwargs)
        write_model_card(save_directory, self)

    def s2_attention_settings(self, model_attn_implementation: str | None = None) -> S2AttentionSettings:
        """The S2-Attn settings this config gives a model loaded with `model_attn_implementation` (an unset
        inner kernel follows it, as `get_peft_model` does).

        Args:
            model_attn_implementation (`str`, *optional*):
                The attention the model was loaded with (`config._attn_implementation`); used only when
                `inner_attn_implementation` is unset.

        Returns:
            `S2AttentionSettings`: the group size, shift and inner kernel.
        """
        settings = {name: getattr(self, name) for name in S2_SETTINGS_FIELDS}
        settings["inner_attn_implementation"] = self.inner_attn_implementation or inner_attn_implementation_for(
            model_attn_implementation
        )
        return S2AttentionSettings(**settings)


def longlora_config_of(model) -> LongLoraConfig | None:
    """The `LongLoraConfig` of `model`'s active adapter, or None when `model` is not a PEFT model with an
    active LongLoRA adapter.

    Args:
        model:
            Any model; a `PeftModel` is read through its `active_peft_config`.

    Returns:
        `LongLoraConfig` or `None`.
    """
    config = getattr(model, "active_peft_config", None)
    return config if isinstance(config, LongLoraConfig) else None
