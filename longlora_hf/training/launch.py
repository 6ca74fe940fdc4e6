"""What actually runs under a launcher, stated and checked before training.

`accelerate launch` can start something other than what its config asks for, and say nothing: on a
machine without GPUs an FSDP config runs plain data parallelism (accelerate shards with FSDP only on
accelerators), `--cpu` turns a 2-process config into one process, and a `MULTI_CPU` config starts one
process unless an MPI launcher starts the others. `distributed_setup` reads what accelerate set up;
`check_launch` compares it with what the launch asked for (`WORLD_SIZE`, `ACCELERATE_USE_FSDP`,
`ACCELERATE_USE_DEEPSPEED`) and refuses a mismatch before any training step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistributedSetup:
    """The distributed set-up of this process, as accelerate runs it."""

    distributed_type: str  # accelerate's DistributedType name: NO, MULTI_CPU, MULTI_GPU, DEEPSPEED, FSDP...
    processes: int
    process_index: int
    data_parallel: int  # processes / sequence_parallel
    zero_stage: int | None = None  # under DeepSpeed
    offload: str | None = None  # under DeepSpeed: what ZeRO offloads and where ("optimizer cpu, parameters cpu")
    fsdp_version: int | None = None  # under FSDP
    sequence_parallel: int | None = None  # when a ParallelismConfig sets sp_size > 1
    final: bool = True  # read from the Accelerator's state (False: from TrainingArguments' PartialState, before it)

    def __str__(self) -> str:
        if self.processes == 1 and self.distributed_type == "NO":
            return "1 process (not distributed)"
        parts = [
            f"{self.distributed_type}",
            f"{self.processes} processes (this is rank {self.process_index})",
            f"data-parallel {self.data_parallel}",
        ]
        if self.zero_stage is not None:
            parts.append(f"ZeRO stage {self.zero_stage}" + (f" (offload: {self.offload})" if self.offload else ""))
        if self.fsdp_version is not None:
            parts.append(f"FSDP{self.fsdp_version}")
        if self.sequence_parallel:
            parts.append(f"sequence-parallel {self.sequence_parallel}")
        return ", ".join(parts)


def distributed_setup() -> DistributedSetup:
    """The set-up accelerate runs in this process: from the full `AcceleratorState` once an `Accelerator`
    exists (the Trainer makes one), else from the `PartialState` that `TrainingArguments` creates."""
    from accelerate.state import AcceleratorState, PartialState

    full = AcceleratorState._shared_state != {}
    try:
        state = AcceleratorState() if full else PartialState()
    except ValueError:  # an AcceleratorState left half-built (created outside an Accelerator): the process state
        full, state = False, PartialState()
    kind = state.distributed_type.name if hasattr(state.distributed_type, "name") else str(state.distributed_type)
    zero = offload = fsdp = None
    parallelism = getattr(state, "parallelism_config", None) if full else None
    if full:
        plugin = getattr(state, "deepspeed_plugin", None)
        zero = getattr(plugin, "zero_stage", None) if kind == "DEEPSPEED" else None
        if zero is not None:
            zero_config = (getattr(plugin, "deepspeed_config", None) or {}).get("zero_optimization", {})
            places = {
                what: (zero_config.get(f"offload_{key}") or {}).get("device", "none")
                for what, key in (("optimizer", "optimizer"), ("parameters", "param"))
            }
            offload = ", ".join(f"{what} {device}" for what, device in places.items() if device != "none") or None
        fsdp = getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None) if kind == "FSDP" else None
    sp = getattr(parallelism, "sp_size", None)
    sp = sp if sp and sp > 1 else None
    # processes per data-parallel replica: tensor, context and sequence parallelism share one batch
    non_data = 1
    for name in ("tp_size", "cp_size", "sp_size"):
        non_data *= getattr(parallelism, name, None) or 1
    return DistributedSetup(
        kind,
        state.num_processes,
        state.process_index,
        max(1, state.num_processes // non_data),
        zero,
        offload,
        fsdp,
        sp,
        full,
    )


def check_launch(setup: DistributedSetup | None = None) -> DistributedSetup:
    """Refuse a run that is not what its launch asked for; return the set-up. Raises ValueError naming what
    was asked, what runs, and the fix."""
    setup = setup or distributed_setup()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and setup.processes == 1:
        raise ValueError(
            f"the launcher started {world} processes (WORLD_SIZE={world}), but this one runs alone "
            f"({setup.distributed_type}): every process would train the whole model by itself and write the same "
            "output_dir. Check the accelerate config: on a CPU, `--cpu` or `use_cpu: true` with FSDP give one "
            "process each; use the CPU configs in tests/configs (DeepSpeed, or DDP with distributed_type MULTI_GPU "
            "and use_cpu: true)."
        )
    # Before the Trainer's Accelerator exists, accelerate reports FSDP on GPUs as MULTI_GPU (and DeepSpeed on a
    # CPU as MULTI_CPU); it never shards with FSDP on a CPU (MULTI_CPU) or in a process started alone (NO).
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and (
        setup.distributed_type in ("NO", "MULTI_CPU") or (setup.final and setup.distributed_type != "FSDP")
    ):
        raise ValueError(
            f"the accelerate config asks for FSDP (ACCELERATE_USE_FSDP=true), but accelerate runs "
            f"{setup.distributed_type} with {setup.processes} process(es): accelerate shards with FSDP only on "
            "accelerators (CUDA, XPU, NPU...) and in processes started by `accelerate launch` or `torchrun`, so here "
            "every process would hold and train the whole model. Launch the FSDP config on GPUs with `accelerate "
            "launch`; on a CPU use a DeepSpeed ZeRO-3 config (tests/configs/cpu_deepspeed_zero3.yaml)."
        )
    deepspeed_asked = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed_asked and setup.final and setup.distributed_type != "DEEPSPEED":
        raise ValueError(
            f"the accelerate config asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true), but accelerate runs "
            f"{setup.distributed_type}. Check that deepspeed is installed (pip install 'longlora-hf[deepspeed]')."
        )
    return setup


def is_main_process() -> bool:
    """Whether this process is the launch's main one (global rank 0, or a process no launcher started), as
    accelerate's `PartialState` knows it."""
    from accelerate import PartialState

    return PartialState().is_main_process


def launched_processes() -> int:
    """How many processes the launch started (accelerate's `PartialState`)."""
    from accelerate import PartialState

    return PartialState().num_processes


def say(line: str, stream) -> None:
    """Print `line` on the main process only: one line per launch, not one per rank."""
    if is_main_process():
        print(line, file=stream, flush=True)


def leave_without_interpreter_teardown(code: int) -> None:
    """Exit a launched rank whose run has ended and been saved, skipping interpreter teardown.

    With DeepSpeed on the CPU, a Gloo worker thread still finishing DeepSpeed's asynchronous communication
    can need the GIL while the interpreter tears down, and the rank aborts ("terminate called without an
    active exception") after a good, saved run, failing the launch. Still needed after the trainer has
    ended its process group (`accelerator.end_training()`): without this exit, the ZeRO-3 resume test
    (`test_a_zero3_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_adapter`) aborted so in 1
    of 6 runs on a loaded 2-core machine. The atexit handlers (experiment trackers, logging) run first,
    while Python is whole. Remove once DeepSpeed's CPU communication is joined at `destroy_process_group`.

    Args:
        code: The exit code.
    """
    import atexit
    import sys

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
