"""`LongLoraSFTTrainer`: TRL's `SFTTrainer` with `LongLoraCallback` added and the LongLoRA model card."""

from __future__ import annotations

import math
import os

import trl

from ..model_card import write_model_card
from ..tuner import longlora_config_of
from .callback import LongLoraCallback


class LongLoraSFTTrainer(trl.SFTTrainer):
    """`trl.SFTTrainer`, plus two things: `LongLoraCallback` is added when the callbacks lack one, and the
    LongLoRA card from `model_cards/` states what the trainer knows (data, steps, last evaluation): in
    every directory `save_model` writes (checkpoints included; a card someone wrote is kept), and from
    `create_model_card` (what `trainer.push_to_hub()` calls) instead of TRL's card. Everything else,
    arguments included, is `SFTTrainer`'s."""

    def __init__(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        if not any(isinstance(c, LongLoraCallback) or c is LongLoraCallback for c in callbacks):
            callbacks.append(LongLoraCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, LongLoraCallback):
                callback.trainer_writes_card = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`SFTTrainer.save_model` (checkpoints too), then the LongLoRA card with what the trainer knows so far
        in the saved directory, unless a card someone wrote is there."""
        super().save_model(output_dir, _internal_call=_internal_call)
        self._write_card(output_dir or self.args.output_dir, overwrite=False)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        if longlora_config_of(self.model) is None:  # not a LongLoRA model: TRL's card
            return super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags, **kwargs)
        return self._write_card(self.args.output_dir, overwrite=True, model_name=model_name, dataset_name=dataset_name, tags=tags)

    def _write_card(self, directory: str, *, overwrite: bool, model_name=None, dataset_name=None, tags=None):
        """The LongLoRA card in `directory`, from the main process, with the data, steps and last evaluation."""
        config = longlora_config_of(self.model)
        if config is None or not self.is_world_process_zero():
            return None
        args = self.args
        rows = len(self.train_dataset) if self.train_dataset is not None and hasattr(self.train_dataset, "__len__") else None
        data = dataset_name or (f"{rows:,} training rows (source not recorded)" if rows else None)
        steps = None
        if self.state.global_step:
            steps = (
                f"{self.state.global_step} (per-device batch {args.per_device_train_batch_size}, gradient accumulation "
                f"{args.gradient_accumulation_steps}, {args.world_size} process(es), lr {args.learning_rate:g}, "
                f"max_length {getattr(args, 'max_length', None)})"
            )
        evaluations = [entry for entry in self.state.log_history if "eval_loss" in entry]
        evaluation = None
        if evaluations:
            last = evaluations[-1]
            evaluation = (
                f"Evaluation during training (dense attention, rows of up to {getattr(args, 'max_length', None)} tokens): "
                f"loss {last['eval_loss']:.4f}, perplexity {math.exp(last['eval_loss']):.2f} at step {last.get('step')}."
            )
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        extra_tags += [*(getattr(self.model, "model_tags", None) or []), *self._tag_names]
        repo = self.hub_model_id or model_name
        return write_model_card(
            directory, config, overwrite=overwrite, repo_or_path=repo or os.path.basename(os.path.abspath(args.output_dir)),
            training_data=data, training_steps=steps, evaluation=evaluation, tags=extra_tags,
        )
