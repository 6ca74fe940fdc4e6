"""TRL's SFT script with LongLoRA switched on.

    python -m longlora_hf.sft --config trainer_configs/recipes/tiny_cpu.yaml
    accelerate launch --config_file trainer_configs/accelerate/deepspeed_zero3.yaml -m longlora_hf.sft --config RECIPE
    longlora-hf sft --config RECIPE [any flag of `trl sft`] [--target_context_length 8192 ...]

Every flag and YAML key of `trl sft` works unchanged, plus the LongLoRA ones below. The script runs
TRL's own `trl.scripts.sft.main`; LongLoRA enters through the two names that function resolves when
it runs: the PEFT config it builds (a `LongLoraConfig` from the `--lora_*` flags and the LongLoRA
ones, instead of a `LoraConfig`) and the trainer class (`SFTTrainer` with `LongLoraCallback` added).
Both are put back when the run ends.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

from .tuner import LongLoraConfig


@dataclass
class LongLoraArguments:
    """The LongLoRA options of `longlora-hf sft` (the LoRA rank, alpha, dropout and targets are TRL's `--lora_*`)."""

    longlora: bool = field(default=True, metadata={"help": "Train with LongLoRA. False runs plain `trl sft`."})
    target_context_length: int | None = field(
        default=None,
        metadata={"help": "Context to train for; RoPE is interpolated by ceil(target / current context). Default: max_length."},
    )
    rope_type: str = field(default="linear", metadata={"help": "RoPE extension: 'linear' (the paper's), 'dynamic' or 'yarn'."})
    use_s2_attn: bool = field(default=True, metadata={"help": "Train with shifted sparse attention (S2-Attn)."})
    group_size_ratio: float = field(default=0.25, metadata={"help": "S2-Attn group size as a fraction of the sequence length."})
    group_size: int | None = field(default=None, metadata={"help": "Absolute S2-Attn group size; overrides group_size_ratio."})
    trainable_embeddings: bool = field(default=True, metadata={"help": "Train the input embedding (LoRA+)."})
    trainable_norms: bool = field(default=True, metadata={"help": "Train every normalization layer (LoRA+)."})


def longlora_config(model_args, training_args, longlora_args: LongLoraArguments) -> LongLoraConfig:
    """A LongLoraConfig from TRL's `--lora_*` flags and the LongLoRA ones (TRL's defaults for r and alpha
    are the paper's too: 8 and 16)."""
    return LongLoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        modules_to_save=model_args.lora_modules_to_save,
        target_context_length=longlora_args.target_context_length or training_args.max_length,
        rope_type=longlora_args.rope_type,
        use_s2_attn=longlora_args.use_s2_attn,
        group_size_ratio=longlora_args.group_size_ratio,
        group_size=longlora_args.group_size,
        trainable_embeddings=longlora_args.trainable_embeddings,
        trainable_norms=longlora_args.trainable_norms,
    )


@contextlib.contextmanager
def longlora_in_trl_sft(config: LongLoraConfig):
    """While active, TRL's SFT script builds `config` as its PEFT config and adds LongLoraCallback."""
    import trl

    from .training import LongLoraCallback

    class LongLoraSFTTrainer(trl.SFTTrainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), LongLoraCallback()], **kwargs)

    saved = trl.get_peft_config, trl.SFTTrainer
    trl.get_peft_config, trl.SFTTrainer = (lambda model_args: config), LongLoraSFTTrainer
    try:
        yield
    finally:
        trl.get_peft_config, trl.SFTTrainer = saved


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
    if not longlora_args.longlora:
        trl_sft_main(script_args, training_args, model_args, dataset_args)
        return 0
    model_args.use_peft = True
    with longlora_in_trl_sft(longlora_config(model_args, training_args, longlora_args)):
        trl_sft_main(script_args, training_args, model_args, dataset_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
