"""Run by `torchrun` from tests/test_sequence_parallel.py: S2-Attn under DeepSpeed's Ulysses sequence
parallelism (ALST) with gloo on the CPU, case by case, as accelerate's Trainer path runs it underneath.

    torchrun --nproc_per_node P tests/support/sp_worker.py OUT_DIR CASE [CASE ...]

For each case (`sp_cases.CASES`) every rank builds the same tiny LongLoRA model and batch (`sp_cases`),
DeepSpeed's `UlyssesSPAttentionHF.register_with_transformers` wraps "s2" (disable_in_eval=True, as accelerate
registers it), and each rank runs its 1/P slice of the sequence: position ids and labels shifted before
slicing (what `UlyssesSPDataLoaderAdapter` hands each rank), the losses combined weighted by their tokens and the
gradients summed over the group (what `deepspeed_sp_compute_loss` and the gradient reduction do; this
combination gives P times the gradient, divided out here). Rank 0 writes OUT_DIR/CASE.json (loss, layouts
built per forward) and OUT_DIR/CASE.safetensors (gradients; for `trains` cases also the evaluation logits of
`sp_cases.eval_batches` after two SGD steps) and, for `trains` cases, the adapter in OUT_DIR/CASE-adapter. The
single-process reference is computed by the test, in its own process, without sequence parallelism.

A case with `ignore_head_offset` (the negative control) makes every rank place its heads as if it held the
first ones, as "s2" did before it knew its global head offset.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the `support` package

import deepspeed.comm as ds_comm  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import longlora_hf.attention.s2 as s2_module  # noqa: E402
from support.sp_cases import CASES, build_model, eval_batches, sgd_step, train_batch  # noqa: E402


def count_layouts() -> list[int]:
    """Wrap the layout builder with a counter: [calls]."""
    calls = [0]
    build = s2_module.s2_layout

    def counted(*args, **kwargs):
        calls[0] += 1
        return build(*args, **kwargs)

    s2_module.s2_layout = counted
    return calls


def main(out: Path, names: list[str]) -> None:
    ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, size = dist.get_rank(), dist.get_world_size()
    layouts = count_layouts()
    heads_held = s2_module.heads_held
    for name in names:
        case = CASES[name]
        model = build_model(case)
        mlp_calls = record_mlp_calls(model)
        group = register_sequence_parallel(model, case, size)
        # the negative control: as "s2" was before it knew which heads a rank holds
        s2_module.heads_held = (lambda config, heads_here: (0, heads_here)) if case.ignore_head_offset else heads_held
        batch = train_batch(case)
        chunk = batch["input_ids"].shape[1] // size
        mine = slice(rank * chunk, (rank + 1) * chunk)
        shift_labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
        batch["shift_labels"] = shift_labels
        # contiguous, as the adapter's copy to the CPU leaves a slice on a GPU machine
        local = {key: value[:, mine].contiguous() for key, value in batch.items() if key != "labels"}
        local["labels"] = local["shift_labels"]  # what transformers' deepspeed_sp_compute_loss passes
        results, tensors = {"processes": size}, {}
        for step in range(2 if case.trains else 1):
            layouts[0] = 0
            s2_module._without_mask.clear()  # forget the layouts of earlier forwards: count this one's
            loss = combined_loss(model, local, group)
            loss.backward()
            results.setdefault("layouts_per_step", []).append(layouts[0])
            grads = {}
            for parameter_name, parameter in model.named_parameters():
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad, group=group)
                    parameter.grad /= size
                    grads[parameter_name] = parameter.grad
            if step == 0:
                results["loss"] = loss.item()
                results["largest_mlp_call"] = max(mlp_calls, default=None)
                tensors.update({f"grad.{k}": v.clone() for k, v in grads.items()})
            if case.trains:
                sgd_step(model)
        if case.trains:
            model.eval()
            with torch.no_grad():
                for kind, rows in eval_batches(case).items():
                    tensors[f"eval_logits.{kind}"] = model(**rows).logits
            if rank == 0:
                model.save_pretrained(out / f"{name}-adapter")
        if rank == 0:
            (out / f"{name}.json").write_text(json.dumps(results))
            save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"{name}.safetensors")
        dist.barrier()


def record_mlp_calls(model) -> list[int]:
    """The number of tokens each call of a tiled MLP receives (empty when no MLP is tiled)."""
    from longlora_hf.tuner.tiled_mlp import TiledMLP

    calls = []
    for module in model.modules():
        if isinstance(module, TiledMLP):
            module.mlp.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[:-1].numel()))
    return calls


def combined_loss(model, local, group) -> torch.Tensor:
    """The loss of the whole sequence from each rank's mean over its tokens, weighted by its token count."""
    loss = model(**local).loss
    tokens = (local["shift_labels"] != -100).sum()
    losses = torch.distributed.nn.functional.all_gather(loss, group=group)
    counts = torch.distributed.nn.functional.all_gather(tokens, group=group)
    losses, counts = torch.stack(losses), torch.stack(counts)
    return (torch.where(counts > 0, losses, 0) * counts).sum() / counts.sum().clamp(min=1)


def register_sequence_parallel(model, case, size):
    """DeepSpeed's Ulysses wrapper around "s2" for this case's head counts, as accelerate registers it; the
    wrapper of an earlier case (other head counts) and its group are released first. Returns the group."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as state
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS["s2"] = s2_module.s2_attention_forward
    state._release_sequence_parallel_groups()
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model,
        "s2",
        sequence_parallel_size=size,
        micro_batch_size=case.batch,
        seq_length_is_variable=True,
        disable_in_eval=True,
    )
    return mpu.get_sequence_parallel_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
