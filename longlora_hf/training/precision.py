"""Which precision a training run computes in, and whether the CPU runs it fast.

TRL's `SFTConfig` turns bf16 autocast on by default. On a CPU without native bf16 instructions (AVX512-BF16 or
AMX on x86, the BF16 extension on Arm) every bf16 matmul is emulated, many times slower than float32
(docs/training.md has the measurement).
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX512-BF16, AMX), Arm (FEAT_BF16)


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively, read from the flags Linux lists in `cpuinfo`; False where they
    cannot be read (other systems)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & NATIVE_BF16_FLAGS)


def trains_on_cpu(args) -> bool:
    """Whether the Trainer with these arguments runs on the CPU (`use_cpu`, or no accelerator)."""
    if getattr(args, "use_cpu", False):
        return True
    mps = getattr(torch.backends, "mps", None)
    return not (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or (mps is not None and mps.is_available())
    )


def precision(args, model=None) -> str:
    """The precision a run computes in: the autocast the arguments ask for, over the weights' dtype."""
    autocast = (
        "bf16 autocast" if getattr(args, "bf16", False) else "fp16 autocast" if getattr(args, "fp16", False) else None
    )
    dtype = None
    if model is not None:
        dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()), None)
    weights = f"{dtype} weights" if dtype else None
    return ", ".join(part for part in (autocast or "no autocast", weights) if part)


def slow_bf16_warning(args) -> str | None:
    """A warning when bf16 autocast would run on a CPU without native bf16; None otherwise."""
    if not getattr(args, "bf16", False) or not trains_on_cpu(args) or cpu_has_native_bf16():
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"LongLoRA: bf16 autocast is on, but this CPU ({platform.machine()}, {capability}) has no native bf16: "
        "every bf16 matmul is emulated, about 15x slower than float32 (19.3 s against 1.2 s a step on an AVX2 CPU). "
        "Pass --bf16 false (TRL's SFTConfig turns it on by default) to train in float32."
    )
