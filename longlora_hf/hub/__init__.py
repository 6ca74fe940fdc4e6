"""Checkpoints in and out: merging an adapter into a plain model, converting reference checkpoints."""

from .convert import convert_reference_checkpoint
from .merge import merge_adapter

__all__ = ["convert_reference_checkpoint", "merge_adapter"]
