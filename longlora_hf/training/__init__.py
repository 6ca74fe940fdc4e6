"""Training integration: the Trainer/TRL callback, the SFT trainer with the LongLoRA card, and LongQA /
LongAlpaca formatting."""

from .callback import LongLoraCallback, LongLoraReport
from .formatting import (
    LONGQA_PROMPT,
    LongAlpacaFields,
    LongQAFields,
    format_longalpaca,
    format_longqa,
    format_records,
    read_records,
)
from .trainer import LongLoraSFTTrainer


__all__ = [
    "LONGQA_PROMPT",
    "LongAlpacaFields",
    "LongLoraCallback",
    "LongLoraReport",
    "LongLoraSFTTrainer",
    "LongQAFields",
    "format_longalpaca",
    "format_longqa",
    "format_records",
    "read_records",
]
