"""`longlora-hf sft`: TRL's SFT script with LongLoRA.

    longlora-hf sft --config trainer_configs/recipes/tiny_cpu.yaml [any flag of `trl sft`] [--target_context_length 8192 ...]
    accelerate launch --config_file trainer_configs/accelerate/deepspeed_zero3.yaml -m longlora_hf.sft --config RECIPE

`main` has the shape of TRL's `trl/scripts/sft.py` and is parsed by TRL's own parser, so every flag and
YAML key of `trl sft` works unchanged, plus the LongLoRA ones (`LongLoraArguments`). It loads the data
as TRL's script does, formats LongQA/LongAlpaca records when asked, and trains `LongLoraSFTTrainer`
(`SFTTrainer` + `LongLoraCallback` + the LongLoRA card) with a `LongLoraConfig` built from TRL's
`--lora_*` flags and the LongLoRA ones. `--longlora false` trains TRL's `SFTTrainer` with TRL's PEFT
config: `trl sft`. Nothing outside this package is reassigned.
"""

from __future__ import annotations

import logging
import os
import sys
import typing
from dataclasses import dataclass, field, make_dataclass

from .training.formatting import check_record_format, check_too_long, record_fields
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
    return name, typing.get_type_hints(LongLoraConfig)[name], field(default=source.default, metadata={"help": help_text})


@dataclass
class _SftArguments:
    longlora: bool = field(default=True, metadata={"help": "Train with LongLoRA. False runs plain `trl sft`."})
    record_format: str | None = field(
        default=None,
        metadata={
            "help": "Format the records before training: 'longqa' ({material_type, material_content, question, "
            "answer}, the paper's LongQA prompt) or 'longalpaca' ({instruction, output[, input]}, Llama-2 [INST]). The "
            "answer becomes the completion, so the loss is on it only. Default: the data is used as TRL reads it."
        },
    )
    record_fields: str | None = field(
        default=None,
        metadata={"help": "Field names other than the defaults, as role=column pairs, e.g. 'material_content=context,answer=response'."},
    )
    too_long: str = field(
        default="truncate",
        metadata={"help": "A LongQA record longer than max_length: 'truncate' (cut the end of the material) or 'drop'."},
    )


LongLoraArguments = make_dataclass("LongLoraArguments", [_config_flag(name) for name in CONFIG_FLAGS], bases=(_SftArguments,))
LongLoraArguments.__module__ = __name__
LongLoraArguments.__doc__ = (
    "The LongLoRA options of `longlora-hf sft`: `--longlora`, the data formatting flags, and the LongLoraConfig "
    f"fields {', '.join(CONFIG_FLAGS)} (the LoRA rank, alpha, dropout and targets are TRL's `--lora_*`)."
)


def longlora_config(model_args, training_args, longlora_args) -> LongLoraConfig:
    """A LongLoraConfig from TRL's LoRA flags (those TRL's `get_peft_config` reads: `--lora_*`, `--use_rslora`,
    `--use_dora`) and the LongLoRA ones."""
    flags = {name: getattr(longlora_args, name) for name in CONFIG_FLAGS}
    flags["target_context_length"] = flags["target_context_length"] or training_args.max_length
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
        return load_named_dataset(script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    raise ValueError("Either `datasets` or `dataset_name` must be provided.")


def local_record_files(dataset_args) -> list[str]:
    """The local .json/.jsonl files of a `datasets:` mixture."""
    from pathlib import Path

    paths = []
    for dataset in dataset_args.datasets or []:
        files = dataset.data_files
        files = files.values() if isinstance(files, dict) else [files]
        for group in files:
            for path in [group] if isinstance(group, str) else (group or []):
                if isinstance(path, str) and path.endswith((".json", ".jsonl")) and Path(path).is_file():
                    paths.append(path)
    return paths


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
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    max_length = training_args.max_length
    formatted = DatasetDict()
    for split, rows in dataset.items():
        examples, counts = format_records(rows.to_list(), style, tokenizer, max_length, longlora_args.too_long, fields)
        formatted[split] = Dataset.from_list(examples)
        if os.environ.get("RANK", "0") == "0":  # every rank formats; the main one says so
            logger.warning(
                f"LongLoRA {style} formatting of split {split!r}: {counts['kept']} kept, {counts['truncated']} "
                f"truncated, {counts['dropped']} dropped (max_length {max_length}, too_long={longlora_args.too_long!r})"
            )
    return formatted


def training_data(script_args, training_args, model_args, dataset_args, longlora_args):
    """The dataset as the trainer gets it: loaded as TRL's script loads it, then formatted with `--record_format`."""
    from .training import read_records

    try:
        dataset = load_dataset(script_args, dataset_args)
        if longlora_args.record_format is not None:
            dataset = format_dataset(dataset, longlora_args, model_args, training_args)
    except Exception:
        if longlora_args.record_format is not None:
            # A bad local file fails inside `datasets` with a pyarrow error; read it again through
            # `read_records`, whose errors name the file and the line (only now: the data may be large).
            for path in local_record_files(dataset_args):
                read_records(path)
        raise
    return dataset


def main(script_args, training_args, model_args, dataset_args, longlora_args) -> None:
    """TRL's SFT script (`trl/scripts/sft.py: main`) with LongLoRA: the same model loading, data loading,
    training, saving and publishing; `LongLoraSFTTrainer` and a `LongLoraConfig` unless `--longlora false`."""
    dataset = prepare(script_args, training_args, model_args, dataset_args, longlora_args)
    train(script_args, training_args, model_args, longlora_args, dataset)


def prepare(script_args, training_args, model_args, dataset_args, longlora_args):
    """The first half of `main`, where bad input shows: the LongLoRA flags checked, the data loaded and formatted."""
    check_longlora_arguments(longlora_args)
    return training_data(script_args, training_args, model_args, dataset_args, longlora_args)


def train(script_args, training_args, model_args, longlora_args, dataset) -> None:
    """Train on `dataset`, save, publish with `--push_to_hub`, and end the run: the second half of `main`."""
    from trl import SFTTrainer, get_peft_config, get_quantization_config

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
    if longlora_args.longlora:
        trainer_class, peft_config = LongLoraSFTTrainer, longlora_config(model_args, training_args, longlora_args)
    else:
        trainer_class, peft_config = SFTTrainer, get_peft_config(model_args)
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    # What `Trainer.end()` (transformers >= 5.18) does: finish the trackers and leave the process group.
    trainer.accelerator.end_training()


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
            setattr(model_args, name, paper if longlora_args.longlora else ModelConfig.__dataclass_fields__[name].default)
    return parsed


def run(args) -> int:
    """`longlora-hf sft`. Bad input (flags, options, data) found before training ends with one line and exit
    code 2; an error during training keeps its traceback."""
    try:
        script_args, training_args, model_args, dataset_args, longlora_args = parse_arguments(args.command_argv)
        dataset = prepare(script_args, training_args, model_args, dataset_args, longlora_args)
    except (ValueError, FileNotFoundError) as error:
        print(f"longlora-hf sft: error: {error}", file=sys.stderr)
        return 2
    train(script_args, training_args, model_args, longlora_args, dataset)
    return 0


def register(subparsers) -> None:
    """`longlora-hf sft`: every argument after the command goes to TRL's parser."""
    parser = subparsers.add_parser(
        "sft",
        help="TRL's SFT script with LongLoRA: every flag of TRL's SFT script plus the LongLoRA ones (see `longlora-hf sft --help`).",
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
    main(*parse_arguments(prog="python -m longlora_hf.sft"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_without_interpreter_teardown(0)
