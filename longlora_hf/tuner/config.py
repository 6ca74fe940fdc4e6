"""`LongLoraConfig`: LoRA+ with S2-Attn and position interpolation, as a PEFT config."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig
from peft.utils import PeftType

from ..attention import S2AttentionSettings
from .position_interpolation import ROPE_TYPES

PEFT_TYPE = "LONGLORA"


@dataclass
class LongLoraConfig(LoraConfig):
    """LongLoRA (Chen et al., ICLR 2024): LoRA on the attention projections, plus trainable embeddings and
    normalization layers ("LoRA+", paper Section 3.3), trained with shifted sparse attention (S2-Attn,
    Section 3.2) at a context extended by position interpolation.

    `get_peft_model(model, LongLoraConfig(target_context_length=32768))`:
    1. rescales RoPE linearly by `ceil(target / current context)` (the reference code's rule) and raises
       `max_position_embeddings`; both are recorded here and restored whenever the adapter is loaded;
    2. puts LoRA on the attention projections, found per architecture (`q_proj/k_proj/v_proj/o_proj`,
       fused `query_key_value`/`qkv_proj` and `dense`, ...) unless `target_modules` is given;
    3. makes the input embedding and every normalization layer trainable and saved with the adapter
       (`modules_to_save`), found by module type, so architectures nobody listed work too; tied
       input/output embeddings stay tied;
    4. switches the model to `attn_implementation="s2"` with the configured group size.

    A model loaded for inference (`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`) gets the
    position interpolation back and runs dense attention. Defaults are the paper's.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank. The paper uses 8."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha. The paper uses 16."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input. The paper uses none."})
    task_type: str = field(default="CAUSAL_LM", metadata={"help": "Always CAUSAL_LM: LongLoRA extends decoders."})
    target_context_length: int | None = field(
        default=None,
        metadata={
            "help": "The context length to train for, in tokens. When it exceeds the model's current context "
            "(max_position_embeddings times any existing linear RoPE factor), RoPE is interpolated by "
            "ceil(target / current). None keeps the model's positions."
        },
    )
    rope_type: str = field(
        default="linear",
        metadata={
            "help": "How RoPE is extended: 'linear' position interpolation (the paper's), or transformers' "
            "'dynamic' (NTK) or 'yarn' scaling with the same factor."
        },
    )
    use_s2_attn: bool = field(
        default=True,
        metadata={"help": "Train with shifted sparse attention (attn_implementation='s2'). Inference is always dense."},
    )
    group_size_ratio: float = field(
        default=0.25,
        metadata={"help": "S2-Attn group size as a fraction of each sequence's length, in (0, 1]. The paper: 1/4."},
    )
    group_size: int | None = field(
        default=None,
        metadata={"help": "Absolute S2-Attn group size in tokens (at least 2); overrides group_size_ratio."},
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
        metadata={"help": "Recorded by get_peft_model: the context the base model's RoPE handled before."},
    )
    position_interpolation_factor: float | None = field(
        default=None,
        metadata={"help": "Recorded by get_peft_model: the RoPE factor the adapter was trained with (1.0: none)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType(PEFT_TYPE)
        if self.target_context_length is not None and (
            isinstance(self.target_context_length, bool)
            or not isinstance(self.target_context_length, int)
            or self.target_context_length <= 0
        ):
            raise ValueError(
                f"target_context_length must be a positive integer number of tokens; got "
                f"{self.target_context_length!r}. Use e.g. 32768, or None to keep the model's positions."
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}; got {self.rope_type!r}.")
        self.s2_attention_settings()  # validates group_size_ratio and group_size

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save the config, and the LongLoRA model card as README.md in place of PEFT's generic one
        (a card someone wrote is kept)."""
        super().save_pretrained(save_directory, **kwargs)
        from ..hub.card import write_model_card

        write_model_card(save_directory, self)

    def s2_attention_settings(self) -> S2AttentionSettings:
        return S2AttentionSettings(group_size_ratio=self.group_size_ratio, group_size=self.group_size)


def longlora_config_of(model) -> LongLoraConfig | None:
    """The `LongLoraConfig` of `model`'s active adapter, or None when `model` is not a PEFT model with an
    active LongLoRA adapter."""
    config = getattr(model, "active_peft_config", None)
    return config if isinstance(config, LongLoraConfig) else None
