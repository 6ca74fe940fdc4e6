"""`longlora-hf sft`: TRL's SFT script with LongLoRA.

    longlora-hf sft --config trainer_configs/recipes/tiny_cpu.yaml [any flag of `trl sft`]
        [--target_context_length 8192 ...]
    accelerate launch --config_file trainer_configs/accelerate/deepspeed_zero3.yaml -m longlora_hf.sft --config RECIPE

`main` has the shape of TRL's `trl/scripts/sft.py` and is parsed by TRL's own parser, so every flag and
YAML key of `trl sft` works unchanged, plus the LongLoRA ones (`LongLoraArguments`). It loads the data
as TRL's script does, formats LongQA/LongAlpaca records when asked, and trains `LongLoraSFTTrainer`
(`SFTTrainer` + `LongLoraCallback` + the LongLoRA card) with a `LongLoraConfig` built from TRL's
`--lora_*` flags and the LongLoRA ones. `--longlora false` trains TRL's `SFTTrainer` with TRL's PEFT
config: `trl sft`. Nothing outside this package is reassigned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import typing
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path

from .hub.push import HubError
from .paths import check_model_source, check_output_place, claimed_directory
from .training.formatting import check_record_format, check_too_long, check_training_file, read_records, record_fields
from .training.precision import slow_bf16_warning
from .tuner import LongLoraConfig


logger = logging.getLogger(__name__)

# The LongLoRA fields of `LongLoraConfig` that are flags of `longlora-hf sft`, with the config's own defaults and
# help (the S2 ones come from S2AttentionSettings through it): one definition for the tuner, the flags and the
# backend. LoRA's rank, alpha, dropout and targets are TRL's `--lora_*` flags.
CONFIG_FLAGS = (
    "target_context_length",
    "rope_type",
    "use_s2_attn",
    "group_size_ratio",
    "group_size",
    "shift",
    "inner_attn_implementation",
    "trainable_embeddings",
    "trainable_norms",
)


def _config_flag(name: str):
    source = LongLoraConfig.__dataclass_fields__[name]
    help_text = source.metadata["help"]
    if name == "target_context_length":
        help_text += " Default here: max_length."
    return (
        name,
        typing.get_type_hints(LongLoraConfig)[name],
        field(default=source.default, metadata={"help": help_text}),
    )


@dataclass
class _SftArguments:
    longlora: bool = field(default=True, metadata={"help": "Train with LongLoRA. False runs plain `trl sft`."})
    record_format: str | None = field(
        default=None,
        metadata={
            "help": "Format the records before training: 'longqa' ({material_type, material_content, "
            "question, answer}, the paper's LongQA prompt) or 'longalpaca' ({instruction, output[, input]}, "
            "Llama-2 [INST]). The answer becomes the completion, so the loss is on it only. Default: the data is "
            "used as TRL reads it."
        },
    )
    record_fields: str | None = field(
        default=None,
        metadata={
            "help": "Field names other than the defaults, as role=column pairs, e.g. "
            "'material_content=context,answer=response'."
        },
    )
    too_long: str = field(
        default="truncate",
        metadata={
            "help": "A LongQA record longer than max_length: 'truncate' (cut the end of the material) or 'drop'."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an output_dir that already holds files (an earlier run's checkpoints, or files of "
            "your own): the Trainer writes over what has the same names. Without it such an output_dir is refused, "
            "unless resuming with --resume_from_checkpoint."
        },
    )

    sp_size: int = field(
        default=1,
        metadata={
            "help": "Sequence parallelism (DeepSpeed Ulysses, ALST): each of sp_size ranks holds 1/sp_size of every "
            "training sequence, so a sequence can be sp_size times longer than one device holds. Needs `accelerate "
            "launch` with a DeepSpeed config and a number of processes divisible by sp_size (data-parallel size: "
            "processes / sp_size); batches are padded to a multiple of sp_size. 1: off."
        },
    )


LongLoraArguments = make_dataclass(
    "LongLoraArguments", [_config_flag(name) for name in CONFIG_FLAGS], bases=(_SftArguments,)
)
LongLoraArguments.__module__ = __name__
LongLoraArguments.__doc__ = (
    "The LongLoRA options of `longlora-hf sft`: `--longlora`, the data formatting flags, and the LongLoraConfig "
    f"fields {', '.join(CONFIG_FLAGS)} (the LoRA rank, alpha, dropout and targets are TRL's `--lora_*`)."
)


def longlora_config(model_args, training_args, longlora_args) -> LongLoraConfig:
    """A LongLoraConfig from TRL's LoRA flags (those TRL's `get_peft_config` reads: `--lora_*`, `--use_rslora`,
    `--use_dora`) and the LongLoRA ones."""
    flags = {name: getattr(longlora_args, name) for name in CONFIG_FLAGS}
    if flags["target_context_length"] is None:
        flags["target_context_length"] = training_args.max_length
    if model_args.lora_target_parameters is not None:
        flags["target_parameters"] = model_args.lora_target_parameters
    return LongLoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        **flags,
    )


def check_longlora_arguments(longlora_args) -> None:
    """The data-formatting flags, checked before anything is loaded."""
    if longlora_args.record_format is None:
        return
    check_record_format(longlora_args.record_format, "--record_format")
    check_too_long(longlora_args.too_long, "--too_long")
    record_fields(longlora_args.record_format, longlora_args.record_fields, "--record_fields")


def check_numbers(training_args, model_args) -> None:
    """The numeric flags of TRL's SFT script that reach a library unchecked, refused with the flag, the value and
    the rule (the LongLoRA ones are checked by `LongLoraConfig`)."""

    def refuse(flag, value, rule):
        raise ValueError(f"--{flag} must be {rule}; got {value!r}.")

    if training_args.max_length is not None and training_args.max_length < 1:
        refuse("max_length", training_args.max_length, "a positive number of tokens (or unset: no truncation)")
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, flag) < 1:
            refuse(flag, getattr(training_args, flag), "at least 1")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        refuse("max_steps", training_args.max_steps, "a positive number of steps, or -1 (train --num_train_epochs)")
    if training_args.max_steps == -1 and not training_args.num_train_epochs > 0:
        refuse("num_train_epochs", training_args.num_train_epochs, "positive (or set --max_steps)")
    if training_args.learning_rate < 0:
        refuse("learning_rate", training_args.learning_rate, "0 or more")
    for flag, strategy in (("save_steps", "save_strategy"), ("eval_steps", "eval_strategy")):
        value = getattr(training_args, flag)
        chosen = getattr(training_args, strategy)
        if getattr(chosen, "value", chosen) == "steps" and value is not None and not value > 0:
            refuse(
                flag, value, f"positive with --{strategy} steps (a number of steps, or a fraction of the run below 1)"
            )
    if model_args.lora_r is not None and model_args.lora_r < 1:
        refuse("lora_r", model_args.lora_r, "at least 1")
    if model_args.lora_alpha is not None and not model_args.lora_alpha > 0:
        refuse("lora_alpha", model_args.lora_alpha, "positive")
    if not 0 <= model_args.lora_dropout < 1:
        refuse("lora_dropout", model_args.lora_dropout, "in [0, 1)")


def check_context_covers_max_length(target_context_length: int | None, max_length: int | None) -> None:
    """The context LongLoRA extends to must hold the training sequences (`LongLoraCallback` would refuse it once
    the model is loaded)."""
    if target_context_length is not None and max_length is not None and target_context_length < max_length:
        raise ValueError(
            f"--target_context_length {target_context_length} is below --max_length {max_length}: the model would "
            f"train on sequences longer than its context. Set --target_context_length {max_length} or more (unset, it "
            "is max_length), or lower --max_length."
        )


def _local(value) -> Path | None:
    """`value` as a local path when it is one that exists, else None (a Hub id, a builder name like 'json')."""
    if not isinstance(value, (str, os.PathLike)):
        return None
    path = Path(value).expanduser()
    return path if path.exists() else None


def _sources(script_args, dataset_args, with_paths_beside_files: bool) -> list[Path]:
    """The local sources of the data: each mixture entry's `data_files`, and its `path` (always, or only when it
    has no `data_files`); `--dataset_name` without a mixture. Those that exist here, each once."""
    found = []
    for dataset in dataset_args.datasets or []:
        files = dataset.data_files
        for group in files.values() if isinstance(files, dict) else [files]:
            found.extend(_local(p) for p in ([group] if isinstance(group, (str, os.PathLike)) else (group or [])))
        if with_paths_beside_files or not files:
            found.append(_local(dataset.path))
    if not dataset_args.datasets:
        found.append(_local(script_args.dataset_name))
    return [path for path in dict.fromkeys(found) if path is not None]


def local_data_paths(script_args, dataset_args) -> list[Path]:
    """The local files and directories the data comes from (what an output must stay out of): a `datasets:`
    mixture's `path` and `data_files`, or `--dataset_name` when it names a local directory or file."""
    return _sources(script_args, dataset_args, with_paths_beside_files=True)


# Files `datasets` keeps beside the data in a dataset directory, not data itself.
DATASET_METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}


def local_data_files(script_args, dataset_args) -> list[Path]:
    """The local .json/.jsonl/.txt data files: a mixture's `data_files` where given, else the files of a local
    directory (`path`, `--dataset_name`), searched as `datasets` does, without hidden and metadata files."""
    files = []
    for path in _sources(script_args, dataset_args, with_paths_beside_files=False):
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        files.extend(
            p
            for p in candidates
            if p.is_file()
            and p.suffix in (".json", ".jsonl", ".txt")
            and p.name not in DATASET_METADATA
            and not any(part.startswith(".") for part in p.relative_to(path.parent).parts)
        )
    return files


def check_local_data(script_args, training_args, dataset_args, longlora_args) -> None:
    """Read every local data file once before anything is trained: with --record_format, as records of that
    format (`read_records`); else as TRL's SFT will need them (`check_training_file`). Errors name the file and
    the record."""
    for path in local_data_files(script_args, dataset_args):
        if longlora_args.record_format is not None:
            if path.suffix in (".json", ".jsonl"):
                read_records(path)
        else:
            check_training_file(path, training_args.dataset_text_field)


def check_bitsandbytes(flag: str) -> None:
    """QLoRA (TRL's `--load_in_4bit`, or `--load_in_8bit`) loads the base through bitsandbytes, an optional extra."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ValueError(
            f"{flag} quantizes the base model with bitsandbytes, which cannot be imported ({error}): "
            "pip install 'longlora-hf[qlora]'."
        ) from None


def check_sp_size(sp_size, model_args, training_args) -> None:
    """`--sp_size`: a whole number; above 1, a DeepSpeed launch whose processes it divides, and a model whose
    attention heads it splits (read from a local model's config)."""
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
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world % sp_size:
        raise ValueError(
            f"--sp_size {sp_size} must divide the number of processes ({world}): the processes form data-parallel "
            f"groups of sp_size ranks. Launch {sp_size} x k processes, or pick an sp_size that divides {world}."
        )
    if _local(model_args.model_name_or_path) is not None:
        from transformers import AutoConfig

        from .attention.sequence_parallel import check_sequence_parallel_heads

        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code
        )
        check_sequence_parallel_heads(config, sp_size, f"--model_name_or_path {model_args.model_name_or_path}")


def check_output_dir(script_args, training_args, model_args, dataset_args) -> None:
    """Where the output_dir is, by the rule of `longlora_hf.paths`: a directory, never the model or the data (or
    inside or around them), and writable."""
    inputs = {
        "--model_name_or_path": model_args.model_name_or_path,
        "data": local_data_paths(script_args, dataset_args),
    }
    check_output_place(training_args.output_dir, "--output_dir", inputs)


def check_output_dir_contents(training_args, longlora_args) -> None:
    """What the output_dir already holds (checked once the run has claimed it): files there are refused unless
    the run resumes (`--resume_from_checkpoint`) or `--overwrite_output_dir`."""
    output = Path(training_args.output_dir).expanduser()
    held = sorted(os.listdir(output)) if output.is_dir() else []
    if held and training_args.resume_from_checkpoint is None and not longlora_args.overwrite_output_dir:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise FileExistsError(
            f"--output_dir {training_args.output_dir} already holds files ({shown}). Pass --resume_from_checkpoint "
            "true to continue the run that wrote them, --overwrite_output_dir true to train over them, or choose an "
            "empty --output_dir."
        )


class RunFinished(Exception):
    """The checkpoint to resume from ends a finished run: nothing to train, nothing written."""


def resolve_resume(training_args) -> None:
    """Make `--resume_from_checkpoint` a complete checkpoint. 'true' (or 'last') means the newest complete
    checkpoint of output_dir; newer incomplete ones (a run killed while saving) are skipped and named. A
    checkpoint given by path must be complete, or the error says what is missing and which one to use."""
    wanted = training_args.resume_from_checkpoint
    if wanted is not None:
        _resolve_checkpoint(training_args)
        check_not_finished(training_args)


def check_not_finished(training_args) -> None:
    """A run resumed from a checkpoint that already reached its end trains nothing and changes nothing (raises
    `RunFinished`); raise --max_steps or --num_train_epochs to train on from it."""
    from .training.checkpoints import finished

    checkpoint = training_args.resume_from_checkpoint
    reason = finished(checkpoint, training_args.max_steps, training_args.num_train_epochs)
    if reason is not None:
        raise RunFinished(
            f"nothing to train: the run in {checkpoint} has finished ({reason}); --output_dir "
            f"{training_args.output_dir} is left as it is. To train on from it, raise --max_steps or "
            "--num_train_epochs."
        )


def _resolve_checkpoint(training_args) -> None:
    from .training.checkpoints import incomplete, last_complete_checkpoint

    wanted = training_args.resume_from_checkpoint
    if str(wanted).lower() in ("true", "last"):
        found, skipped = last_complete_checkpoint(training_args.output_dir)
        for checkpoint, reason in skipped.items():
            logger.warning(f"LongLoRA: skipping the incomplete checkpoint {checkpoint}: {reason}.")
        if found is None:
            why = "".join(f"; {p.name}: {r}" for p, r in skipped.items())
            raise ValueError(
                f"--resume_from_checkpoint {wanted}: no complete checkpoint in --output_dir {training_args.output_dir}"
                f"{why}. Start a new run (without --resume_from_checkpoint) in an empty --output_dir."
            )
        if skipped:
            logger.warning(f"LongLoRA: resuming from {found}.")
        training_args.resume_from_checkpoint = str(found)
        return
    reason = incomplete(wanted)
    if reason is not None:
        parent = Path(wanted).parent
        found, _ = last_complete_checkpoint(parent) if parent.is_dir() else (None, {})
        fix = (
            f"resume from {found} (the newest complete one), or pass --resume_from_checkpoint true"
            if found
            else "start a new run"
        )
        raise ValueError(
            f"--resume_from_checkpoint {wanted} cannot be resumed from: {reason}. {fix[0].upper() + fix[1:]}."
        )


def load_dataset(script_args, dataset_args):
    """The dataset, loaded by the rules of TRL's SFT script: a `datasets:` mixture wins over `dataset_name`."""
    from datasets import load_dataset as load_named_dataset
    from trl import get_dataset

    if dataset_args.datasets:
        if script_args.dataset_name and os.environ.get("RANK", "0") == "0":
            logger.warning(
                "Both `datasets` and `dataset_name` are provided. The `datasets` argument will be used to load the "
                "dataset and `dataset_name` will be ignored."
            )
        return get_dataset(dataset_args)
    if script_args.dataset_name:
        return load_named_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    raise ValueError("Either `datasets` or `dataset_name` must be provided.")


def format_dataset(dataset, longlora_args, model_args, training_args):
    """Each split of `dataset` as TRL prompt/completion rows in the `--record_format`, logging per split what was
    kept, truncated and dropped at `max_length`."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from .training import format_records

    style = longlora_args.record_format
    if not isinstance(dataset, DatasetDict):
        raise ValueError(f"--record_format needs a map-style dataset (not streaming); got {type(dataset).__name__}.")
    fields = record_fields(style, longlora_args.record_fields, "--record_fields")
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    max_length = training_args.max_length
    formatted = DatasetDict()
    for split, rows in dataset.items():
        examples, counts = format_records(rows.to_list(), style, tokenizer, max_length, longlora_args.too_long, fields)
        formatted[split] = Dataset.from_list(examples)
        if os.environ.get("RANK", "0") == "0":  # every rank formats; the main one says so
            logger.warning(
                f"LongLoRA {style} formatting of split {split!r}: {counts['kept']} kept, {counts['truncated']} "
                f"truncated, {counts['dropped']} dropped (max_length {max_length}, "
                f"too_long={longlora_args.too_long!r})"
            )
    return formatted


def training_data(script_args, training_args, model_args, dataset_args, longlora_args):
    """The dataset as the trainer gets it: loaded as TRL's script loads it, then formatted with `--record_format`."""
    dataset = load_dataset(script_args, dataset_args)
    if longlora_args.record_format is not None:
        dataset = format_dataset(dataset, longlora_args, model_args, training_args)
    return dataset


def main(script_args, training_args, model_args, dataset_args, longlora_args) -> int:
    """TRL's SFT script (`trl/scripts/sft.py: main`) with LongLoRA: the same model loading, data loading,
    training, saving and publishing; `LongLoraSFTTrainer` and a `LongLoraConfig` unless `--longlora false`.
    The arguments are checked first (`check_arguments`); then the output_dir is claimed for the run
    (`claimed_output_dir`) and what it holds, the checkpoint and the data are checked (`check_run_state`).

    Returns the exit code: 2 for input refused before training, said in one line by the main process (every rank
    of a launch checks the same input; none prints a traceback), 0 otherwise, also for a finished run resumed
    (nothing to train). An error during training keeps its traceback."""
    with contextlib.ExitStack() as claim:
        try:
            check_arguments(script_args, training_args, model_args, dataset_args, longlora_args)
            claim.enter_context(claimed_output_dir(training_args))
            check_run_state(script_args, training_args, dataset_args, longlora_args)
            dataset = training_data(script_args, training_args, model_args, dataset_args, longlora_args)
        except RunFinished as finished:
            _say(f"longlora-hf sft: {finished}", sys.stdout)
            return 0
        except (ValueError, OSError) as error:
            _say(f"longlora-hf sft: error: {error}", sys.stderr)
            return 2
        try:
            train(script_args, training_args, model_args, longlora_args, dataset)
        except KeyboardInterrupt:
            _say(f"longlora-hf sft: interrupted; {_resume_hint(training_args.output_dir)}", sys.stderr)
            return 130
        except HubError as error:
            _say(f"longlora-hf sft: error: {error}", sys.stderr)
            return 2
    return 0


def _resume_hint(output_dir) -> str:
    """What an interrupted run left to resume from."""
    from .training.checkpoints import last_complete_checkpoint

    found, _ = last_complete_checkpoint(output_dir)
    if found is None:
        return f"no complete checkpoint was saved in {output_dir} (see --save_strategy), so a new run starts over."
    return f"the newest complete checkpoint is {found}: continue with --resume_from_checkpoint true."


def _say(line: str, stream) -> None:
    """Print on the main process only (global rank 0, or a process no launcher started)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=stream, flush=True)


def claimed_output_dir(training_args):
    """On the main process (global rank 0), the claim on output_dir that refuses a second run writing to it at the
    same time (`longlora_hf.paths.claimed_directory`); the other ranks of a launch share their main one's. A
    refused main process exits with code 2, and `accelerate launch`/`torchrun` stop the other ranks with it; a
    launcher that sets no RANK (plain `srun`, `mpirun`) makes every process claim, so use one that does."""
    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return claimed_directory(training_args.output_dir, "--output_dir")


def check_arguments(script_args, training_args, model_args, dataset_args, longlora_args) -> None:
    """What can be checked before anything is written: the launch (what it asked for is what runs), the flags
    and numbers, the model path, where the output_dir is."""
    from .training.launch import check_launch

    check_launch()
    check_longlora_arguments(longlora_args)
    check_numbers(training_args, model_args)
    slow = slow_bf16_warning(training_args)
    if slow and os.environ.get("RANK", "0") == "0":
        logger.warning(slow)
    if longlora_args.longlora:
        longlora_config(model_args, training_args, longlora_args)  # validates the LongLoRA flags
        check_context_covers_max_length(longlora_args.target_context_length, training_args.max_length)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        check_bitsandbytes("--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit")
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required: the model to fine-tune (a local directory or a Hub id).")
    # "config": TRL's loader takes .bin weights too; safetensors present are checked
    check_model_source(model_args.model_name_or_path, "--model_name_or_path", "config")
    check_sp_size(longlora_args.sp_size, model_args, training_args)
    if longlora_args.longlora and longlora_args.use_s2_attn:
        check_s2_trains(model_args, training_args)
    check_output_dir(script_args, training_args, model_args, dataset_args)


def check_s2_trains(model_args, training_args) -> None:
    """A local model S2-Attn cannot train is refused before it is loaded (from its config, on the meta device);
    a Hub model is checked when it is loaded."""
    if _local(model_args.model_name_or_path) is None:
        return
    from transformers import AutoConfig

    from .attention import check_s2_compatible_config

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code
    )
    check_s2_compatible_config(config)


def check_run_state(script_args, training_args, dataset_args, longlora_args) -> None:
    """Checked once the run holds the output_dir, before anything is loaded: what the output_dir holds, the
    checkpoint to resume from, every local data file."""
    check_output_dir_contents(training_args, longlora_args)
    resolve_resume(training_args)
    check_local_data(script_args, training_args, dataset_args, longlora_args)


def train(script_args, training_args, model_args, longlora_args, dataset) -> None:
    """Train on `dataset`, save, publish with `--push_to_hub`, and end the run: the second half of `main`."""
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from .hub.push import hub_errors
    from .training import LongLoraSFTTrainer

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs
    if longlora_args.sp_size > 1:
        from .training.sequence_parallel import use_sequence_parallelism

        # under LongLoRA, LongLoraCallback names the attention the model runs once S2 is on (accelerate refuses
        # "s2" by name here); `--longlora false` wraps the model's own
        wrapped = None if longlora_args.longlora else model_args.attn_implementation or "sdpa"
        use_sequence_parallelism(training_args, longlora_args.sp_size, wrapped)
    if longlora_args.longlora:
        trainer_class, peft_config = LongLoraSFTTrainer, longlora_config(model_args, training_args, longlora_args)
    else:
        trainer_class, peft_config = SFTTrainer, get_peft_config(model_args)
    creating_repo = (
        hub_errors(training_args.hub_model_id, action="creating the repo for --push_to_hub (nothing trained yet)")
        if training_args.push_to_hub
        else contextlib.nullcontext()
    )
    with creating_repo:  # the Trainer creates the Hub repo when it is built
        trainer = trainer_class(
            model=model_args.model_name_or_path,
            args=training_args,
            train_dataset=dataset[script_args.dataset_train_split],
            eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
            quantization_config=get_quantization_config(model_args),
            peft_config=peft_config,
        )
    if longlora_args.sp_size > 1:  # `--longlora false` has no LongLoraCallback to start it
        from .training.sequence_parallel import start_deepspeed_comm

        start_deepspeed_comm()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    save_model_whole(trainer, training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        with hub_errors(trainer.hub_model_id, kept=f"the trained adapter is saved in {training_args.output_dir}"):
            trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    # What `Trainer.end()` (transformers >= 5.18) does: finish the trackers and leave the process group.
    trainer.accelerator.end_training()


def save_model_whole(trainer, output_dir: str) -> None:
    """`trainer.save_model(output_dir)`, written first into a partial directory inside output_dir and then
    renamed into place file by file, so a run killed while saving leaves each file whole (the earlier one, as
    after a resumed run, or the new one), never a torn adapter file. A README.md someone wrote is kept, as
    `save_pretrained` keeps it. Every rank takes part (ZeRO-3 gathers the weights); the main one moves the
    files."""
    import shutil

    from .model_card import is_replaceable_card

    partial = Path(output_dir) / ".final-model.longlora-hf-partial"
    if trainer.args.should_save:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    trainer.save_model(str(partial))
    if trainer.args.should_save:
        configs_last = sorted(partial.iterdir(), key=lambda entry: (entry.name.endswith("config.json"), entry.name))
        for entry in configs_last:
            target = Path(output_dir) / entry.name
            if entry.name == "README.md" and target.is_file() and not is_replaceable_card(target):
                entry.unlink()
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        partial.rmdir()
    trainer.accelerator.wait_for_everyone()


# LoRA's rank and alpha when neither a flag nor the recipe sets them: the paper's under LongLoRA (Section 4.1:
# r=8, alpha=16), TRL's own (ModelConfig: 16 and 32) under `--longlora false`, as `trl sft` trains.
PAPER_LORA_DEFAULTS = {"lora_r": 8, "lora_alpha": 16}


def make_parser(prog: str | None = None):
    """TRL's SFT parser (`trl/scripts/sft.py: make_parser`) with `LongLoraArguments` added. `--lora_r` and
    `--lora_alpha` default to unset, so `parse_arguments` can tell a default from a value someone chose."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, LongLoraArguments), prog=prog)
    parser.set_defaults(**dict.fromkeys(PAPER_LORA_DEFAULTS))
    return parser


def parse_arguments(argv: list[str] | None = None, prog: str = "longlora-hf sft"):
    """(script, training, model, dataset, LongLoRA) arguments from `argv`: flags and `--config` YAML, as TRL's
    SFT script reads them; unknown flags are refused. An unset LoRA rank or alpha is the paper's under LongLoRA
    and TRL's under `--longlora false` (`PAPER_LORA_DEFAULTS`)."""
    from trl import ModelConfig

    parsed = make_parser(prog=prog).parse_args_and_config(args=argv, fail_with_unknown_args=True)
    model_args, longlora_args = parsed[2], parsed[4]
    for name, paper in PAPER_LORA_DEFAULTS.items():
        if getattr(model_args, name) is None:
            setattr(
                model_args, name, paper if longlora_args.longlora else ModelConfig.__dataclass_fields__[name].default
            )
    return parsed


def run(args) -> int:
    """`longlora-hf sft`. Bad input (flags, options, data) found before training ends with one line and exit
    code 2; an error during training keeps its traceback."""
    try:
        parsed = parse_arguments(args.command_argv)
    except (ValueError, OSError) as error:
        print(f"longlora-hf sft: error: {error}", file=sys.stderr)
        return 2
    return main(*parsed)


def register(subparsers) -> None:
    """`longlora-hf sft`: every argument after the command goes to TRL's parser."""
    parser = subparsers.add_parser(
        "sft",
        help=(
            "TRL's SFT script with LongLoRA: every flag of TRL's SFT script plus the LongLoRA ones "
            "(see `longlora-hf sft --help`)."
        ),
        add_help=False,
    )
    parser.set_defaults(run=run, parses_its_own_arguments=True, reports_its_own_errors=True)


def leave_without_interpreter_teardown(code: int) -> None:
    """Exit a launched rank whose run has ended and been saved, skipping interpreter teardown.

    With DeepSpeed on the CPU, a Gloo worker thread still finishing DeepSpeed's asynchronous communication
    can need the GIL while the interpreter tears down, and the rank aborts ("terminate called without an
    active exception") after a good, saved run, failing the launch. Still needed after the trainer has
    ended its process group (`accelerator.end_training()`): without this exit, the ZeRO-3 resume test
    (`test_a_zero3_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_adapter`) aborted so in 1
    of 6 runs on a loaded 2-core machine. The atexit handlers (experiment trackers, logging) run first,
    while Python is whole. Remove once DeepSpeed's CPU communication is joined at `destroy_process_group`.
    """
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main(*parse_arguments(prog="python -m longlora_hf.sft"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_without_interpreter_teardown(code)
    sys.exit(code)
