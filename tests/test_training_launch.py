"""What runs under a launcher is what the launch asked for, and the LongLoRA report says what ran."""

from __future__ import annotations

import pytest

from longlora_hf.training.launch import DistributedSetup, check_launch, distributed_setup


ONE = DistributedSetup("NO", 1, 0, 1)


def test_a_process_running_alone_where_the_launcher_started_several_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ValueError, match=r"the launcher started 2 processes \(WORLD_SIZE=2\), but this one runs alone"
    ):
        check_launch(ONE)


@pytest.mark.parametrize(
    "setup",
    [
        DistributedSetup("MULTI_CPU", 2, 0, 2, final=False),
        DistributedSetup("MULTI_CPU", 2, 1, 2),
        DistributedSetup("MULTI_GPU", 2, 0, 2),
    ],
    ids=["cpu-before-the-accelerator", "cpu", "gpu-without-the-fsdp-plugin"],
)
def test_fsdp_asked_but_not_sharding_is_refused(monkeypatch, setup):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ValueError, match=rf"asks for FSDP \(ACCELERATE_USE_FSDP=true\), but accelerate runs {setup.distributed_type}"
    ):
        check_launch(setup)


def test_what_the_launch_asked_for_passes_and_is_described(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    on_gpus = DistributedSetup("FSDP", 2, 0, 2, fsdp_version=2)
    assert (
        check_launch(on_gpus) is on_gpus
        and str(on_gpus) == "FSDP, 2 processes (this is rank 0), data-parallel 2, FSDP2"
    )
    assert check_launch(
        DistributedSetup("MULTI_GPU", 2, 0, 2, final=False)
    )  # FSDP on GPUs before the Accelerator exists
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    zero3 = DistributedSetup("DEEPSPEED", 2, 1, 2, zero_stage=3)
    assert str(check_launch(zero3)) == "DEEPSPEED, 2 processes (this is rank 1), data-parallel 2, ZeRO stage 3"
    with pytest.raises(ValueError, match="asks for DeepSpeed"):
        check_launch(DistributedSetup("MULTI_CPU", 2, 0, 2))


def test_a_single_process_is_described_as_such(monkeypatch):
    from transformers import TrainingArguments

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])  # creates accelerate's process state
    assert str(check_launch(distributed_setup())) == "1 process (not distributed)"
