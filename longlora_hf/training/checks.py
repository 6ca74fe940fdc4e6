"""What `longlora-hf sft` checks before it loads anything: the launch, the flags and numbers, the model, where the
output goes, and (once the run holds its output_dir) what that holds, the checkpoint to resume from and every
local data file. Each refusal is a `ValueError` or `OSError` naming the flag, the value and the fix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..paths import check_model_source, check_output_place
from .arguments import SftArguments, longlora_config
from .checkpoints import resolve_resume
from .data import is_local, local_data_files, local_data_paths
from .formatting import check_record_format, check_too_long, check_training_file, read_records, record_fields
from .launch import check_launch, is_main_process, launched_processes
from .precision import slow_bf16_warning


logger = logging.getLogger(__name__)


def check_arguments(args: SftArguments) -> None:
    """What can be checked before anything is written: the launch (what it asked for is what runs), the flags
    and numbers, the model, where the output_dir is.

    Raises:
        ValueError: A value that cannot work, named with its fix.
        OSError: A path that cannot be read or written.
    """
    check_launch()
    check_record_flags(args)
    check_numbers(args)
    slow = slow_bf16_warning(args.training)
    if slow and is_main_process():
        logger.warning(slow)
    if args.longlora.longlora:
        longlora_config(args)  # validates the LongLoRA flags
        check_context_covers_max_length(args.longlora.target_context_length, args.training.max_length)
    if args.training.activation_offloading:
        check_activation_offloading()
    if args.model.load_in_4bit or args.model.load_in_8bit:
        check_bitsandbytes("--load_in_4bit" if args.model.load_in_4bit else "--load_in_8bit")
    if args.model.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required: the model to fine-tune (a local directory or a Hub id).")
    # "config": TRL's loader takes .bin weights too; safetensors present are checked
    check_model_source(args.model.model_name_or_path, "--model_name_or_path", "config")
    check_sp_size(args)
    if args.longlora.longlora and args.longlora.use_s2_attn:
        check_s2_trains(args)
    inputs = {"--model_name_or_path": args.model.model_name_or_path, "data": local_data_paths(args)}
    check_output_place(args.training.output_dir, "--output_dir", inputs)


def check_run_state(args: SftArguments) -> None:
    """Checked once the run holds the output_dir, before anything is loaded: what the output_dir holds, the
    checkpoint to resume from (made a complete one, see `resolve_resume`), every local data file.

    Raises:
        RunFinished: The checkpoint to resume from ends a finished run.
        ValueError, OSError: As `check_arguments`.
    """
    check_output_dir_contents(args)
    resolve_resume(args.training)
    check_local_data(args)


def check_record_flags(args: SftArguments) -> None:
    """The data-formatting flags (`--record_format`, `--too_long`, `--record_fields`)."""
    if args.longlora.record_format is None:
        return
    check_record_format(args.longlora.record_format, "--record_format")
    check_too_long(args.longlora.too_long, "--too_long")
    record_fields(args.longlora.record_format, args.longlora.record_fields, "--record_fields")


def check_numbers(args: SftArguments) -> None:
    """The numeric flags of TRL's SFT script that TRL's parser and transformers' `TrainingArguments` accept (a batch
    size of 0, a negative learning rate...), refused with the flag, the value and the rule; the LongLoRA ones are
    checked by `LongLoraConfig`."""
    training, model = args.training, args.model

    def refuse(flag, value, rule):
        raise ValueError(f"--{flag} must be {rule}; got {value!r}.")

    if training.max_length is not None and training.max_length < 1:
        refuse("max_length", training.max_length, "a positive number of tokens (or unset: no truncation)")
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training, flag) < 1:
            refuse(flag, getattr(training, flag), "at least 1")
    if training.max_steps == 0 or training.max_steps < -1:
        refuse("max_steps", training.max_steps, "a positive number of steps, or -1 (train --num_train_epochs)")
    if training.max_steps == -1 and not training.num_train_epochs > 0:
        refuse("num_train_epochs", training.num_train_epochs, "positive (or set --max_steps)")
    if training.learning_rate < 0:
        refuse("learning_rate", training.learning_rate, "0 or more")
    for flag, strategy in (("save_steps", "save_strategy"), ("eval_steps", "eval_strategy")):
        value = getattr(training, flag)
        chosen = getattr(training, strategy)
        if getattr(chosen, "value", chosen) == "steps" and value is not None and not value > 0:
            refuse(
                flag, value, f"positive with --{strategy} steps (a number of steps, or a fraction of the run below 1)"
            )
    if model.lora_r is not None and model.lora_r < 1:
        refuse("lora_r", model.lora_r, "at least 1")
    if model.lora_alpha is not None and not model.lora_alpha > 0:
        refuse("lora_alpha", model.lora_alpha, "positive")
    if not 0 <= model.lora_dropout < 1:
        refuse("lora_dropout", model.lora_dropout, "in [0, 1)")


def check_context_covers_max_length(target_context_length: int | None, max_length: int | None) -> None:
    """The context LongLoRA extends to must hold the training sequences (`LongLoraCallback` would refuse it once
    the model is loaded)."""
    if target_context_length is not None and max_length is not None and target_context_length < max_length:
        raise ValueError(
            f"--target_context_length {target_context_length} is below --max_length {max_length}: the model would "
            f"train on sequences longer than its context. Set --target_context_length {max_length} or more (unset, it "
            "is max_length), or lower --max_length."
        )


def check_activation_offloading() -> None:
    """TRL's `--activation_offloading` moves saved activations from an accelerator to CPU memory; its offloader
    cannot be built where torch sees no accelerator (it fails when the Trainer starts, after the model is loaded)."""
    import torch

    if torch.accelerator.current_accelerator() is None:
        raise ValueError(
            "--activation_offloading moves saved activations from the GPU to CPU memory, but torch sees no GPU (or "
            "other accelerator) here: TRL's offloader would fail when training starts. Drop --activation_offloading; "
            "on the CPU, --mlp_tile_size and --gradient_checkpointing are what lower the memory (docs/memory.md)."
        )


def check_bitsandbytes(flag: str) -> None:
    """QLoRA (TRL's `--load_in_4bit`, or `--load_in_8bit`) loads the base through bitsandbytes, an optional extra."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ValueError(
            f"{flag} quantizes the base model with bitsandbytes, which cannot be imported ({error}): "
            "pip install 'longlora-hf[qlora]'."
        ) from None


def check_sp_size(args: SftArguments) -> None:
    """`--sp_size`: a whole number; above 1, a DeepSpeed launch whose processes it divides, and a model whose
    attention heads it splits (read from a local model's config)."""
    sp_size = args.longlora.sp_size
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(
            f"--sp_size must be a whole number of ranks, at least 1 (1: no sequence parallelism); got {sp_size!r}."
        )
    if sp_size == 1:
        return
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        raise ValueError(
            f"--sp_size {sp_size} runs DeepSpeed's sequence parallelism: launch with `accelerate launch --config_file "
            f"trainer_configs/accelerate/deepspeed_zero3.yaml --num_processes {sp_size} -m longlora_hf.sft ...` (or "
            "another DeepSpeed config)."
        )
    world = launched_processes()
    if world % sp_size:
        raise ValueError(
            f"--sp_size {sp_size} must divide the number of processes ({world}): the processes form data-parallel "
            f"groups of sp_size ranks. Launch {sp_size} x k processes, or pick an sp_size that divides {world}."
        )
    if is_local(args.model.model_name_or_path):
        from ..attention.sequence_parallel import check_sequence_parallel_heads

        check_sequence_parallel_heads(
            _local_config(args), sp_size, f"--model_name_or_path {args.model.model_name_or_path}"
        )


def check_s2_trains(args: SftArguments) -> None:
    """A local model S2-Attn cannot train is refused before it is loaded (from its config, on the meta device);
    a Hub model is checked when it is loaded."""
    if is_local(args.model.model_name_or_path):
        from ..attention import check_s2_compatible_config

        check_s2_compatible_config(_local_config(args))


def _local_config(args: SftArguments):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(args.model.model_name_or_path, trust_remote_code=args.training.trust_remote_code)


def check_output_dir_contents(args: SftArguments) -> None:
    """What the output_dir already holds (checked once the run has claimed it): files there are refused unless
    the run resumes (`--resume_from_checkpoint`) or `--overwrite_output_dir`."""
    training = args.training
    output = Path(training.output_dir).expanduser()
    held = sorted(os.listdir(output)) if output.is_dir() else []
    if held and training.resume_from_checkpoint is None and not args.longlora.overwrite_output_dir:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise FileExistsError(
            f"--output_dir {training.output_dir} already holds files ({shown}). Pass --resume_from_checkpoint "
            "true to continue the run that wrote them, --overwrite_output_dir true to train over them, or choose an "
            "empty --output_dir."
        )


def check_local_data(args: SftArguments) -> None:
    """Read every local data file `datasets` will read (`local_data_files`) once before anything is trained: with
    --record_format, as records of that format (`read_records`); else as TRL's SFT will need them
    (`check_training_file`). Errors name the file and the record."""
    for path in local_data_files(args):
        if args.longlora.record_format is not None:
            if path.suffix in (".json", ".jsonl"):
                read_records(path)
        else:
            check_training_file(path, args.training.dataset_text_field)
