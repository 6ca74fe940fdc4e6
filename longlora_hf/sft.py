"""`longlora-hf sft`: TRL's SFT script with LongLoRA.

    longlora-hf sft --config trainer_configs/recipes/tiny_cpu.yaml [any flag of `trl sft`]
        [--target_context_length 8192 ...]
    accelerate launch --config_file trainer_configs/accelerate/deepspeed_zero3.yaml -m longlora_hf.sft --config RECIPE

`main` has the shape of TRL's `trl/scripts/sft.py` and is parsed by TRL's own parser, so every flag and YAML key
of `trl sft` works unchanged, plus the LongLoRA ones (`longlora_hf.training.arguments.LongLoraArguments`). It
checks what it can before loading anything (`longlora_hf.training.checks`), loads the data as TRL's script does,
formats LongQA/LongAlpaca records when asked (`longlora_hf.training.data`), and trains `LongLoraSFTTrainer`
(`SFTTrainer` + `LongLoraCallback` + the LongLoRA card) with a `LongLoraConfig` built from TRL's `--lora_*` flags
and the LongLoRA ones. `--longlora false` trains TRL's `SFTTrainer` with TRL's PEFT config: `trl sft`. Nothing
outside this package is reassigned.
"""

from __future__ import annotations

import contextlib
import os
import sys

from .hub.push import HubError, hub_errors
from .paths import claimed_directory
from .training.arguments import SftArguments, longlora_config, parse_arguments
from .training.checkpoints import RunFinished, resume_hint, save_model_whole
from .training.checks import check_arguments, check_run_state
from .training.data import training_data
from .training.interrupt import StopOnInterrupt, stop_on_interrupt
from .training.launch import is_main_process, launched_processes, leave_without_interpreter_teardown, say


def main(args: SftArguments) -> int:
    """TRL's SFT script (`trl/scripts/sft.py: main`) with LongLoRA: the same model loading, data loading,
    training, saving and publishing; `LongLoraSFTTrainer` and a `LongLoraConfig` unless `--longlora false`.

    The arguments are checked first (`check_arguments`); then the output_dir is claimed for the run
    (`claimed_output_dir`) and what it holds, the checkpoint and the data are checked (`check_run_state`).

    Args:
        args: The run's arguments (`parse_arguments`).

    Returns:
        The exit code: 2 for input refused before training, said in one line by the main process (every rank of a
        launch checks the same input; none prints a traceback), 130 when interrupted, 0 otherwise, also for a
        finished run resumed (nothing to train). An error during training keeps its traceback.
    """
    with contextlib.ExitStack() as claim:
        try:
            check_arguments(args)
            claim.enter_context(claimed_output_dir(args))
            check_run_state(args)
            dataset = training_data(args)
        except RunFinished as finished:
            say(f"longlora-hf sft: {finished}", sys.stdout)
            return 0
        except (ValueError, OSError) as error:
            say(f"longlora-hf sft: error: {error}", sys.stderr)
            return 2
        try:
            train(args, dataset)
        except KeyboardInterrupt:
            say(f"longlora-hf sft: interrupted; {resume_hint(args.training.output_dir)}", sys.stderr)
            return 130
        except HubError as error:
            say(f"longlora-hf sft: error: {error}", sys.stderr)
            return 2
    return 0


def claimed_output_dir(args: SftArguments):
    """On the main process, the claim on output_dir that refuses a second run writing to it at the same time
    (`longlora_hf.paths.claimed_directory`); the other ranks of a launch share their main one's. A refused main
    process exits with code 2, and `accelerate launch`/`torchrun` stop the other ranks with it."""
    if not is_main_process():
        return contextlib.nullcontext()
    return claimed_directory(args.training.output_dir, "--output_dir")


def train(args: SftArguments, dataset) -> None:
    """Train on `dataset`, save, publish with `--push_to_hub`, and end the run: the second half of `main`."""
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    from .training import LongLoraSFTTrainer

    script_args, training_args, model_args = args.script, args.training, args.model
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    if args.longlora.sp_size > 1:
        from .training.sequence_parallel import use_sequence_parallelism

        # under LongLoRA, LongLoraCallback names the attention the model runs once S2 is on (accelerate refuses
        # "s2" by name here); `--longlora false` wraps the model's own
        wrapped = None if args.longlora.longlora else model_args.attn_implementation or "sdpa"
        use_sequence_parallelism(training_args, args.longlora.sp_size, wrapped)
    if args.longlora.longlora:
        trainer_class, peft_config = LongLoraSFTTrainer, longlora_config(args)
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
    if args.longlora.sp_size > 1:  # `--longlora false` has no LongLoraCallback to start it
        from .training.sequence_parallel import start_deepspeed_comm

        start_deepspeed_comm()
    interrupt = StopOnInterrupt()
    trainer.add_callback(interrupt)
    # one process only: the ranks of a launch could take the signal in different steps and wait for each other
    taking_sigint = stop_on_interrupt(interrupt) if launched_processes() == 1 else contextlib.nullcontext()
    with taking_sigint:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if interrupt.requested:  # stopped early by Ctrl-C: the run is not finished, nothing final is saved
        raise KeyboardInterrupt
    trainer.accelerator.print("Training completed.")
    save_model_whole(trainer, training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        with hub_errors(trainer.hub_model_id, kept=f"the trained adapter is saved in {training_args.output_dir}"):
            trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    # What `Trainer.end()` (transformers >= 5.18) does: finish the trackers and leave the process group.
    trainer.accelerator.end_training()


def run(args) -> int:
    """`longlora-hf sft`. Bad input (flags, options, data) found before training ends with one line and exit
    code 2; an error during training keeps its traceback."""
    try:
        parsed = parse_arguments(args.command_argv)
    except (ValueError, OSError) as error:
        # accelerate may not have set this process up yet (TrainingArguments does, while parsing): the launcher's
        # RANK says which process is the main one, without starting a process group just to print
        if os.environ.get("RANK", "0") == "0":
            print(f"longlora-hf sft: error: {error}", file=sys.stderr)
        return 2
    return main(parsed)


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


if __name__ == "__main__":
    code = main(parse_arguments(prog="python -m longlora_hf.sft"))
    if launched_processes() > 1:
        leave_without_interpreter_teardown(code)
    sys.exit(code)
