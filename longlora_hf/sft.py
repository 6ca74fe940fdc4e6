"""TRL's SFT script with LongLoRA switched on.

    python -m longlora_hf.sft --config trainer_configs/recipes/tiny_cpu.yaml
    accelerate launch --config_file trainer_configs/accelerate/deepspeed_zero3.yaml -m longlora_hf.sft --config RECIPE
    longlora-hf sft --config RECIPE [any flag of `trl sft`] [--target_context_length 8192 ...]

Every flag and YAML key of `trl sft` works unchanged, plus the LongLoRA ones below. The script runs
TRL's own `trl.scripts.sft.main`; LongLoRA enters through the two names that function resolves when
it runs: the PEFT config it builds (a `LongLoraConfig` from the `--lora_*` flags and the LongLoRA
ones, instead of a `LoraConfig`) and the trainer class (`LongLoraSFTTrainer`: `SFTTrainer` with
`LongLoraCallback` added and the LongLoRA model card for `--push_to_hub`).
Both are put back when the run ends.
"""

from __future__ import annotations

import contextlib
import os
import sys
import typing
from dataclasses import dataclass, field, make_dataclass

from .tuner import LongLoraConfig


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
            "help": "Format the records before TRL reads them: 'longqa' ({material_type, material_content, question, "
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
    """A LongLoraConfig from TRL's `--lora_*` flags and the LongLoRA ones (TRL's defaults for r and alpha
    are the paper's too: 8 and 16)."""
    flags = {name: getattr(longlora_args, name) for name in CONFIG_FLAGS}
    flags["target_context_length"] = flags["target_context_length"] or training_args.max_length
    return LongLoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        modules_to_save=model_args.lora_modules_to_save,
        **flags,
    )


def record_fields(style: str, spec: str | None):
    """The field names for `style` from 'role=column,...' (roles are the dataclass fields)."""
    from dataclasses import fields as dataclass_fields
    from dataclasses import replace

    from .training import LongAlpacaFields, LongQAFields

    names = LongQAFields() if style == "longqa" else LongAlpacaFields()
    if not spec:
        return names
    roles = [f.name for f in dataclass_fields(names)]
    changes = {}
    for pair in spec.split(","):
        role, _, column = pair.partition("=")
        role, column = role.strip(), column.strip()
        if role not in roles or not column:
            raise ValueError(f"--record_fields {spec!r}: {pair!r} is not role=column with a role of {style} records ({', '.join(roles)}).")
        changes[role] = column
    return replace(names, **changes)


def check_local_record_files(dataset_args) -> None:
    """Read every local .json/.jsonl data file through `read_records`, whose errors name the file and the
    line of a non-UTF-8, malformed or empty file. Called when a run with `--record_format` failed (loading
    and formatting come before training), so the data is read a second time only then."""
    from pathlib import Path

    from .training import read_records

    for dataset in dataset_args.datasets or []:
        files = dataset.data_files
        files = files.values() if isinstance(files, dict) else [files]
        for group in files:
            for path in [group] if isinstance(group, str) else (group or []):
                if isinstance(path, str) and path.endswith((".json", ".jsonl")) and Path(path).is_file():
                    read_records(path)


def formatter(longlora_args, model_args, training_args):
    """A function DatasetDict -> DatasetDict of TRL prompt/completion rows, saying what it kept, truncated, dropped."""
    import logging

    from .training import format_records

    style = longlora_args.record_format
    if style not in ("longqa", "longalpaca"):
        raise ValueError(f"--record_format must be 'longqa' or 'longalpaca'; got {style!r}.")
    if longlora_args.too_long not in ("truncate", "drop"):
        raise ValueError(f"--too_long must be 'truncate' or 'drop'; got {longlora_args.too_long!r}.")
    fields = record_fields(style, longlora_args.record_fields)
    logger = logging.getLogger(__name__)

    def format_dataset(dataset):
        from datasets import Dataset, DatasetDict
        from transformers import AutoTokenizer

        if not isinstance(dataset, DatasetDict):
            raise ValueError(f"--record_format needs a map-style dataset (not streaming); got {type(dataset).__name__}.")
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

    return format_dataset


@contextlib.contextmanager
def longlora_in_trl_sft(config: LongLoraConfig | None, format_dataset=None):
    """While active, TRL's SFT script builds `config` as its PEFT config and trains with
    `LongLoraSFTTrainer` (SFTTrainer + LongLoraCallback + the LongLoRA model card); with `format_dataset`,
    the dataset it loads goes through it first. `config=None` (plain TRL) leaves the PEFT config and the
    trainer as TRL makes them."""
    import datasets
    import trl

    from .training import LongLoraSFTTrainer

    saved = trl.get_peft_config, trl.SFTTrainer, trl.get_dataset, datasets.load_dataset
    if config is not None:
        trl.get_peft_config, trl.SFTTrainer = (lambda model_args: config), LongLoraSFTTrainer
    if format_dataset is not None:
        depth = [0]

        def formatted(load):
            def load_and_format(*args, **kwargs):
                depth[0] += 1  # get_dataset calls load_dataset: format once, on the way out
                try:
                    dataset = load(*args, **kwargs)
                finally:
                    depth[0] -= 1
                return format_dataset(dataset) if depth[0] == 0 else dataset

            return load_and_format

        trl.get_dataset, datasets.load_dataset = formatted(saved[2]), formatted(saved[3])
    try:
        yield
    finally:
        trl.get_peft_config, trl.SFTTrainer, trl.get_dataset, datasets.load_dataset = saved


def make_parser(subparsers=None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    types = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, LongLoraArguments)
    if subparsers is not None:
        return subparsers.add_parser("sft", help="TRL's SFT script with LongLoRA.", dataclass_types=types)
    return TrlParser(types, prog=prog)


def main(argv: list[str] | None = None) -> int:
    from trl.scripts.sft import main as trl_sft_main

    parser = make_parser(prog="longlora-hf sft")
    script_args, training_args, model_args, dataset_args, longlora_args = parser.parse_args_and_config(
        args=argv, fail_with_unknown_args=True
    )
    format_dataset = None
    if longlora_args.record_format is not None:
        format_dataset = formatter(longlora_args, model_args, training_args)
    config = None
    if longlora_args.longlora:
        model_args.use_peft = True
        config = longlora_config(model_args, training_args, longlora_args)
    try:
        with longlora_in_trl_sft(config, format_dataset):
            trl_sft_main(script_args, training_args, model_args, dataset_args)
    except Exception:
        if format_dataset is not None:
            check_local_record_files(dataset_args)  # a bad data file: its own error names the file and line
        raise
    end_distributed()
    return 0


def end_distributed() -> None:
    """Leave the process groups cleanly once every rank is done. Otherwise, with DeepSpeed on the CPU, a
    Gloo worker thread can still be releasing a tensor when the interpreter shuts down, and the rank aborts
    ("terminate called without an active exception") after a successful run, failing the launch."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()  # the trainer, the DeepSpeed engine and their tensors go now, while Python can still free them


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A launched rank whose run has ended and been saved leaves without interpreter teardown: even after
        # end_distributed, a Gloo worker thread still finishing DeepSpeed's asynchronous communication can
        # need the GIL during teardown and abort the rank (seen in CI under load), failing a good run. The
        # atexit handlers (experiment trackers, logging) still run first, while Python is whole.
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
