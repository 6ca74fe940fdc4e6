"""Which Trainer checkpoints can be resumed from.

The Trainer writes a checkpoint in place, `trainer_state.json` last (after the weights, the optimizer,
the scheduler and the RNG states), so a run killed while saving leaves a `checkpoint-N` without it, or
with a torn one, and resuming from it fails deep inside the Trainer. A checkpoint is complete when its
`trainer_state.json` reads as JSON and its model or adapter weights are there (a safetensors header that
reads, or PyTorch's .bin); `--resume_from_checkpoint true` in `longlora-hf sft` takes the newest complete
one and names the ones it skips.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..paths import check_safetensors


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
