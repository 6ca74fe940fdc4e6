"""Which Trainer checkpoints can be resumed from, and the final save that never leaves a torn file.

The Trainer writes a checkpoint in place, `trainer_state.json` last (after the weights, the optimizer,
the scheduler and the RNG states), so a run killed while saving leaves a `checkpoint-N` without it, or
with a torn one, and resuming from it fails deep inside the Trainer. A checkpoint is complete when its
`trainer_state.json` reads as JSON and its model or adapter weights are there (a safetensors header that
reads, or PyTorch's .bin); `--resume_from_checkpoint true` in `longlora-hf sft` takes the newest complete
one and names the ones it skips.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..paths import check_safetensors


logger = logging.getLogger(__name__)


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")


def incomplete(checkpoint: str | Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return "no such directory"
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json (the Trainer writes it last: the save was interrupted)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"trainer_state.json does not read ({error}): the save was interrupted"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json has no global_step"
    weights = [checkpoint / name for name in WEIGHTS if (checkpoint / name).is_file()]
    weights += sorted(checkpoint.glob("model-*.safetensors"))
    if not weights:
        return f"no model weights ({', '.join(WEIGHTS)})"
    for file in weights:
        if file.suffix == ".safetensors":
            try:
                check_safetensors(file, "checkpoint")
            except ValueError:
                return f"{file.name} is truncated"
    return None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` directories of `output_dir`, newest (highest N) first."""
    found = [
        (int(m.group(1)), p)
        for p in Path(output_dir).glob("checkpoint-*")
        if (m := CHECKPOINT.match(p.name)) and p.is_dir()
    ]
    return [path for _, path in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str | Path) -> tuple[Path | None, dict[Path, str]]:
    """The newest complete checkpoint of `output_dir` (None if there is none), and the newer incomplete ones
    skipped on the way, with why."""
    skipped = {}
    for checkpoint in checkpoints(output_dir):
        reason = incomplete(checkpoint)
        if reason is None:
            return checkpoint, skipped
        skipped[checkpoint] = reason
    return None, skipped


def finished(checkpoint: str | Path, max_steps: int, num_train_epochs: float) -> str | None:
    """How the run of a complete `checkpoint` already reached the end asked for (`max_steps` when positive, else
    `num_train_epochs`), or None when there is training left. The Trainer, resumed from the checkpoint of a
    finished run, still trains one step past it (it checks the end only after a step) and saves over the result."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    step, epoch = state["global_step"], state.get("epoch") or 0.0
    if max_steps > 0:
        return f"it is at step {step} of --max_steps {max_steps}" if step >= max_steps else None
    if epoch >= num_train_epochs - 1e-6:
        return f"it is at epoch {epoch:g} of --num_train_epochs {num_train_epochs:g}"
    return None


class RunFinished(Exception):
    """The checkpoint to resume from ends a finished run: nothing to train, nothing written."""


def resolve_resume(training_args) -> None:
    """Make `--resume_from_checkpoint` a complete checkpoint, and refuse to train past the end of its run.

    'true' (or 'last') means the newest complete checkpoint of output_dir; newer incomplete ones (a run killed
    while saving) are skipped and named. A checkpoint given by path must be complete, or the error says what is
    missing and which one to use.

    Args:
        training_args: The run's `SFTConfig`; its `resume_from_checkpoint` is set to the checkpoint's path.

    Raises:
        ValueError: No complete checkpoint to resume from.
        RunFinished: The checkpoint's run already reached its end (`finished`).
    """
    if training_args.resume_from_checkpoint is None:
        return
    _resolve_checkpoint(training_args)
    checkpoint = training_args.resume_from_checkpoint
    reason = finished(checkpoint, training_args.max_steps, training_args.num_train_epochs)
    if reason is not None:
        raise RunFinished(
            f"nothing to train: the run in {checkpoint} has finished ({reason}); --output_dir "
            f"{training_args.output_dir} is left as it is. To train on from it, raise --max_steps or "
            "--num_train_epochs."
        )


def _resolve_checkpoint(training_args) -> None:
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


def resume_hint(output_dir: str | Path) -> str:
    """What an interrupted run left in `output_dir` to resume from, as a sentence."""
    found, _ = last_complete_checkpoint(output_dir)
    if found is None:
        return f"no complete checkpoint was saved in {output_dir} (see --save_strategy), so a new run starts over."
    return f"the newest complete checkpoint is {found}: continue with --resume_from_checkpoint true."


def save_model_whole(trainer, output_dir: str | Path) -> None:
    """`trainer.save_model(output_dir)`, never leaving a torn file.

    The model is written first into a partial directory inside output_dir and then renamed into place file by
    file, so a run killed while saving leaves each file whole (the earlier one, as after a resumed run, or the
    new one). A README.md someone wrote is kept, as `save_pretrained` keeps it. Every rank takes part (ZeRO-3
    gathers the weights); the main one moves the files.

    Args:
        trainer: The `Trainer` whose model to save.
        output_dir: The run's output directory.
    """
    import os
    import shutil

    from ..model_card import is_replaceable_card

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
