"""Run by `torchrun` from tests/test_fsdp2.py: LongLoRA trained under torch's FSDP2 with gloo on the CPU.

accelerate runs FSDP only on accelerators (its FSDP type is never set for MULTI_CPU), so the Trainer's FSDP
route cannot run on a CPU. This runs what that route runs underneath: `fully_shard` on each decoder layer and
on the root (what accelerate's FSDP2 plugin with TRANSFORMER_BASED_WRAP does), AdamW, the full state dict
gathered to save the adapter, and torch.distributed.checkpoint (DCP) for a sharded checkpoint to resume from.

    torchrun --nproc_per_node 2 tests/support/fsdp2_worker.py OUT_DIR

Writes OUT_DIR/straight and OUT_DIR/resumed (adapters, from rank 0) and OUT_DIR/facts.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from longlora_hf import LongLoraConfig  # noqa: E402
from longlora_hf.demo import ASSETS  # noqa: E402


STEPS, LENGTH, LEARNING_RATE = 4, 512, 1e-3


def rows() -> torch.Tensor:
    """[steps, 2, length] token ids: at each step, one row per rank (the single-process run takes both)."""
    return torch.randint(4, 4096, (STEPS, 2, LENGTH), generator=torch.Generator().manual_seed(0))


def build(shard: bool):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(ASSETS, dtype=torch.float32)
    model = get_peft_model(base, LongLoraConfig(target_context_length=LENGTH, lora_dropout=0.0))
    if shard:
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    return model.train(), optimizer


def train(model, optimizer, steps, batch) -> None:
    for step in steps:
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def save_adapter(model, directory: Path) -> None:
    """Gather the full (unsharded) state dict on every rank's CPU and save the adapter from rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        model.save_pretrained(directory, state_dict=full)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = rows()
    model, optimizer = build(shard=True)
    embedding = model.get_base_model().model.embed_tokens.modules_to_save["default"].weight
    norm = model.get_base_model().model.norm.modules_to_save["default"].weight
    facts = {
        "world_size": dist.get_world_size(),
        "embedding_placements": [str(p) for p in embedding.placements],
        "embedding_local_rows": embedding.to_local().shape[0],
        "embedding_rows": embedding.shape[0],
        "norm_local": norm.to_local().numel(),
        "norm": norm.numel(),
    }
    train(model, optimizer, range(STEPS), lambda step: data[step, rank : rank + 1])
    save_adapter(model, out / "straight")

    model, optimizer = build(shard=True)
    train(model, optimizer, range(STEPS // 2), lambda step: data[step, rank : rank + 1])
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(out / "checkpoint"))
    del model, optimizer
    model, optimizer = build(shard=True)  # a fresh start, as a resumed run has
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(out / "checkpoint"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    train(model, optimizer, range(STEPS // 2, STEPS), lambda step: data[step, rank : rank + 1])
    save_adapter(model, out / "resumed")
    if rank == 0:
        (out / "facts.json").write_text(json.dumps(facts))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
