"""The arguments of `longlora-hf sft`: TRL's SFT script's, plus `LongLoraArguments`.

`parse_arguments` reads flags and `--config` YAML with TRL's own parser (`TrlParser`), so every flag and YAML key
of `trl sft` works unchanged, and returns the five argument groups as one `SftArguments`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import NamedTuple

from ..tuner import LongLoraConfig


if typing.TYPE_CHECKING:
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig


def config_flag(name: str, default_note: str = ""):
    """The dataclass field of the `LongLoraConfig` field `name` as a flag: its default and help (one definition
    for the tuner, the flags and the backend; the S2 ones come from `S2AttentionSettings` through it).

    Args:
        name: A field of `LongLoraConfig`.
        default_note: Appended to the help, where the flag's default differs from the config's.
    """
    source = LongLoraConfig.__dataclass_fields__[name]
    return field(default=source.default, metadata={"help": source.metadata["help"] + default_note})


@dataclass
class LongLoraArguments:
    """The LongLoRA options of `longlora-hf sft`. The LoRA rank, alpha, dropout and targets are TRL's `--lora_*`
    flags; the fields from `target_context_length` on are `LongLoraConfig`'s, with its defaults and help."""

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
    target_context_length: int | None = config_flag("target_context_length", " Default here: max_length.")
    rope_type: str | None = config_flag("rope_type")
    use_s2_attn: bool = config_flag("use_s2_attn")
    group_size_ratio: float = config_flag("group_size_ratio")
    group_size: int | None = config_flag("group_size")
    shift: bool = config_flag("shift")
    inner_attn_implementation: str | None = config_flag("inner_attn_implementation")
    mlp_tile_size: int | None = config_flag("mlp_tile_size")
    trainable_embeddings: bool = config_flag("trainable_embeddings")
    trainable_norms: bool = config_flag("trainable_norms")


# The LongLoraArguments that are LongLoraConfig fields, passed to it as they are.
CONFIG_FLAGS = tuple(
    name for name in LongLoraArguments.__dataclass_fields__ if name in LongLoraConfig.__dataclass_fields__
)


class SftArguments(NamedTuple):
    """The argument groups of `longlora-hf sft`, in the order TRL's SFT script parses its own."""

    script: ScriptArguments
    training: SFTConfig
    model: ModelConfig
    dataset: DatasetMixtureConfig
    longlora: LongLoraArguments


def longlora_config(args: SftArguments) -> LongLoraConfig:
    """The `LongLoraConfig` of a run.

    Args:
        args: The run's arguments: TRL's LoRA flags (those TRL's `get_peft_config` reads: `--lora_*`,
            `--use_rslora`, `--use_dora`) and the LongLoRA ones; an unset `--target_context_length` is
            `--max_length`.

    Raises:
        ValueError: A LongLoRA value the config refuses (named with its fix).
    """
    flags = {name: getattr(args.longlora, name) for name in CONFIG_FLAGS}
    if flags["target_context_length"] is None:
        flags["target_context_length"] = args.training.max_length
    if args.model.lora_target_parameters is not None:
        flags["target_parameters"] = args.model.lora_target_parameters
    return LongLoraConfig(
        r=args.model.lora_r,
        lora_alpha=args.model.lora_alpha,
        lora_dropout=args.model.lora_dropout,
        target_modules=args.model.lora_target_modules,
        modules_to_save=args.model.lora_modules_to_save,
        use_rslora=args.model.use_rslora,
        use_dora=args.model.use_dora,
        **flags,
    )


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


def parse_arguments(argv: list[str] | None = None, prog: str = "longlora-hf sft") -> SftArguments:
    """The arguments of a run, read as TRL's SFT script reads them.

    Args:
        argv: Flags and `--config` YAML (None: `sys.argv`). Unknown flags are refused.
        prog: The program name shown in usage and errors.

    Returns:
        The five argument groups. An unset LoRA rank or alpha is the paper's under LongLoRA and TRL's under
        `--longlora false` (`PAPER_LORA_DEFAULTS`).
    """
    from trl import ModelConfig

    args = SftArguments(*make_parser(prog=prog).parse_args_and_config(args=argv, fail_with_unknown_args=True))
    for name, paper in PAPER_LORA_DEFAULTS.items():
        if getattr(args.model, name) is None:
            default = paper if args.longlora.longlora else ModelConfig.__dataclass_fields__[name].default
            setattr(args.model, name, default)
    return args
