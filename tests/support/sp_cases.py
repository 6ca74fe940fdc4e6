"""The cases of the sequence-parallel tests: tiny LongLoRA models and batches, built the same way by the
`torchrun` worker (tests/support/sp_worker.py, each rank running 1/P of the sequence) and by the test (one process, no
sequence parallelism: the reference)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import get_peft_model

from longlora_hf import LongLoraConfig
from support.helpers import tiny_model


LENGTH = 96  # divisible by 2 and 3; S2 groups of 24 tokens (ratio 1/4)
PAD = 1  # the tiny models' pad_token_id
LEARNING_RATE = 0.05


@dataclass(frozen=True)
class Case:
    architecture: str  # a name in helpers.ARCHITECTURES
    # "whole": one row of LENGTH tokens; "packed": one row of two documents; "padded": two rows, one right-padded
    rows: str
    overrides: dict = field(default_factory=dict)  # config keys over the architecture's
    checkpointing: bool = False  # reentrant gradient checkpointing (what TRL forces for PEFT under ZeRO-3)
    trains: bool = False  # two SGD steps, then evaluation and the adapter
    ignore_head_offset: bool = False  # the negative control: every rank places its heads as if it held the first ones
    mlp_tile_size: int | None = None  # LongLoRA's tiled MLP in the multi-process run (the reference runs untiled)

    @property
    def batch(self) -> int:
        return 2 if self.rows == "padded" else 1


CASES = {
    "mha-whole": Case("llama", "whole", dict(num_key_value_heads=4)),
    "gqa-packed": Case("llama", "packed"),
    "mqa-padded": Case("llama-mqa", "padded"),
    "gqa-checkpointed": Case("llama", "packed", checkpointing=True),
    # 48 tokens per rank in MLP tiles of 10 (the last one short), under reentrant checkpointing
    "gqa-tiled-checkpointed": Case("llama", "packed", checkpointing=True, mlp_tile_size=10),
    "gqa-packed-ignoring-head-offset": Case("llama", "packed", ignore_head_offset=True),
    "gqa-trains": Case("llama", "padded", trains=True),
    # 6 query heads over 3 ranks: rank 1 holds heads 2 (unshifted) and 3 (shifted); 3 kv heads, one per rank
    "six-heads-padded": Case("llama", "padded", dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48)),
}
TWO_PROCESS_CASES = [
    "mha-whole",
    "gqa-packed",
    "mqa-padded",
    "gqa-checkpointed",
    "gqa-tiled-checkpointed",
    "gqa-trains",
    "gqa-packed-ignoring-head-offset",
]
THREE_PROCESS_CASES = ["six-heads-padded"]


def build_model(case: Case, reference: bool = False):
    """The tiny model as a LongLoRA PEFT model (S2 on), LoRA B random so that every LoRA weight has a gradient; the
    case's MLP tiles, except for the `reference` (the single-process run the others are compared with)."""
    model = tiny_model(case.architecture, **case.overrides)
    torch.manual_seed(1)
    config = LongLoraConfig(
        target_context_length=256,
        lora_dropout=0.0,
        init_lora_weights=False,
        mlp_tile_size=None if reference else case.mlp_tile_size,
    )
    model = get_peft_model(model, config)
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    return model.train()


def _rows(kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Token ids, labels, position ids (restarting at each document and on every pad, as TRL's collator makes them
    under sequence parallelism) and, for padded rows, the attention mask."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "whole":
        ids = torch.randint(4, 128, (1, LENGTH), generator=generator)
        return dict(input_ids=ids, labels=ids.clone(), position_ids=torch.arange(LENGTH)[None])
    if kind == "packed":
        ids = torch.randint(4, 128, (1, LENGTH), generator=generator)
        positions = torch.cat([torch.arange(40), torch.arange(LENGTH - 40)])[None]
        return dict(input_ids=ids, labels=ids.clone(), position_ids=positions)
    real = torch.ones(2, LENGTH, dtype=torch.long)
    real[1, 70:] = 0
    ids = torch.randint(4, 128, (2, LENGTH), generator=generator).masked_fill(real == 0, PAD)
    positions = (torch.arange(LENGTH)[None] * real).long()
    return dict(input_ids=ids, labels=ids.masked_fill(real == 0, -100), position_ids=positions, attention_mask=real)


def train_batch(case: Case) -> dict[str, torch.Tensor]:
    return _rows(case.rows, seed=0)


def eval_batches(case: Case) -> dict[str, dict[str, torch.Tensor]]:
    """Evaluation rows as TRL's collator makes them under sequence parallelism: right-padded rows, and a row of
    two packed documents."""
    batches = {kind: _rows(kind, seed=1) for kind in ("padded", "packed")}
    for rows in batches.values():
        rows.pop("labels")
        rows["use_cache"] = False  # as the Trainer evaluates (TRL sets it); with a cache transformers ignores packing
    return batches


def reference_inputs(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What one process trains on: the attention mask marks padding, position ids only mark packed documents."""
    rows = dict(rows)
    if "attention_mask" in rows and "position_ids" in rows:
        rows.pop("position_ids")
    return rows


def sgd_step(model) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= LEARNING_RATE * parameter.grad
                parameter.grad = None
