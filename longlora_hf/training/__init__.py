"""Training integration: the TRL/Trainer callback."""

from .callback import LongLoraCallback, LongLoraReport

__all__ = ["LongLoraCallback", "LongLoraReport"]
