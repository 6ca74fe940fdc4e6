"""LongLoRA under DeepSpeed's Ulysses sequence parallelism (ALST), as accelerate and the Trainer run it.

With `ParallelismConfig(sp_size=N, sp_backend="deepspeed")` (or `--sp_size N` of `longlora-hf sft`) each of N
ranks holds 1/N of every training sequence; accelerate wraps the model's attention function in DeepSpeed's
`UlyssesSPAttentionHF`, which hands "s2" the whole sequence for 1/N of the heads
(`longlora_hf.attention.sequence_parallel` places them). Two things stand in the way, and
`prepare_sequence_parallel` (called by `LongLoraCallback` when the Trainer is built, before accelerate
prepares the model) clears both:

- accelerate's `DeepSpeedSequenceParallelConfig` accepts only flash-attn and SDPA as the attention to wrap,
  although DeepSpeed wraps any name registered with transformers: `use_model_attention_under_sp` sets the
  config's `sp_attn_implementation` to "s2" when the model runs S2 (accelerate then passes it to DeepSpeed,
  which checks it against the model). Goes when accelerate accepts every registered attention function.
- on a CPU, accelerate starts `torch.distributed` (gloo) but not `deepspeed.comm`, which DeepSpeed's Ulysses
  set-up needs before `deepspeed.initialize` would start it: `start_deepspeed_comm` starts it over the
  existing process group. Goes when accelerate starts `deepspeed.comm` for DeepSpeed launches on a CPU too.
"""

from __future__ import annotations

import logging

from ..attention import S2_ATTN_IMPLEMENTATION
from ..attention.sequence_parallel import check_sequence_parallel_heads


logger = logging.getLogger(__name__)


def sequence_parallel_config():
    """The `ParallelismConfig` accelerate's Accelerator runs with, when it is DeepSpeed sequence parallelism with
    sp_size > 1; else None."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state == {}:
        return None
    try:
        config = getattr(AcceleratorState(), "parallelism_config", None)
    except ValueError:  # an AcceleratorState left half-built (created outside an Accelerator): no Trainer's config
        return None
    if config is None or config.sp_backend != "deepspeed" or not config.sp_size or config.sp_size <= 1:
        return None
    return config


def use_model_attention_under_sp(parallelism_config, attn_implementation: str) -> None:
    """Make the attention DeepSpeed wraps the one the model runs: "s2" when the model runs S2 (accelerate's
    validator refuses it at construction), the model's own when none was configured. Another explicit choice
    on a model without S2 is left to accelerate and DeepSpeed to check."""
    handler = parallelism_config.sp_handler
    configured = handler.sp_attn_implementation
    if configured == attn_implementation or (configured is not None and attn_implementation != S2_ATTN_IMPLEMENTATION):
        return
    if configured not in (None, "sdpa"):
        logger.warning(
            f"LongLoRA: the model runs S2-Attn, so sequence parallelism wraps 's2' (not the configured "
            f"sp_attn_implementation={configured!r}; S2 runs its inner kernel inside its groups)."
        )
    handler.sp_attn_implementation = attn_implementation


def start_deepspeed_comm() -> None:
    """Start `deepspeed.comm` over the process group accelerate started, when it is not running (a CPU launch)."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if not ds_comm.is_initialized() and dist.is_initialized():
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def check_sequence_length_divides(args, sp_size: int) -> None:
    """Every batch must split into sp_size equal shares: TRL pads to `pad_to_multiple_of`."""
    multiple = getattr(args, "pad_to_multiple_of", None)
    if hasattr(args, "pad_to_multiple_of") and (multiple or 1) % sp_size:
        raise ValueError(
            f"sequence parallelism over {sp_size} ranks needs every batch's length divisible by {sp_size}, but "
            f"pad_to_multiple_of is {multiple}. Set pad_to_multiple_of={sp_size} (longlora-hf sft --sp_size does)."
        )


def prepare_sequence_parallel(model, args) -> None:
    """Before accelerate prepares `model` under DeepSpeed sequence parallelism: check that its heads split, that
    batches will, wrap the attention the model runs, start `deepspeed.comm`."""
    config = sequence_parallel_config()
    if config is None:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_sequence_parallel_heads(base.config, config.sp_size, type(base).__name__)
    check_sequence_length_divides(args, config.sp_size)
    use_model_attention_under_sp(config, base.config._attn_implementation)
    start_deepspeed_comm()


def use_sequence_parallelism(training_args, sp_size: int, attn_implementation: str | None) -> None:
    """What `longlora-hf sft --sp_size` sets on TRL's arguments: the Trainer's accelerator runs DeepSpeed sequence
    parallelism over sp_size ranks, and TRL pads every batch to a multiple of sp_size so that it splits evenly.
    `attn_implementation`: the attention DeepSpeed wraps, None to leave it to `LongLoraCallback` (the model's own,
    "s2" once LongLoRA switched it on). On a CPU every batch is padded to max_length: DeepSpeed's data adapter
    gathers the batches of the ranks, which gloo (unlike NCCL) refuses when their lengths differ."""
    import math

    import torch
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(
        sp_seq_length_is_variable=True, sp_attn_implementation=attn_implementation
    )
    training_args.parallelism_config = ParallelismConfig(sp_size=sp_size, sp_backend="deepspeed", sp_handler=handler)
    multiple = math.lcm(training_args.pad_to_multiple_of or 1, sp_size)
    if (training_args.use_cpu or not torch.cuda.is_available()) and training_args.max_length:
        multiple = math.lcm(multiple, training_args.max_length)
    training_args.pad_to_multiple_of = multiple
