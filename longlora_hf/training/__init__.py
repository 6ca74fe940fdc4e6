"""Training integration: the Trainer/TRL callback and LongQA / LongAlpaca formatting."""

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

__all__ = [
    "LONGQA_PROMPT",
    "LongAlpacaFields",
    "LongLoraCallback",
    "LongLoraReport",
    "LongQAFields",
    "format_longalpaca",
    "format_longqa",
    "format_records",
    "read_records",
]
