"""Checkpoints in and out: model cards, publishing adapters, merging an adapter into a plain model,
converting reference checkpoints. The cards are rendered by `longlora_hf.model_card`."""

from ..model_card import render_model_card, write_model_card
from .convert import convert_reference_checkpoint
from .merge import merge_adapter
from .push import push_adapter_to_hub


__all__ = [
    "convert_reference_checkpoint",
    "merge_adapter",
    "push_adapter_to_hub",
    "render_model_card",
    "write_model_card",
]
