"""`LongLoraSFTTrainer`: TRL's `SFTTrainer` with `LongLoraCallback` added and the LongLoRA model card."""

from __future__ import annotations

import logging
import math
import os

import torch
import trl

from ..model_card import write_model_card
from ..tuner import longlora_config_of
from .callback import LongLoraCallback


logger = logging.getLogger(__name__)


class LongLoraSFTTrainer(trl.SFTTrainer):
    """`trl.SFTTrainer`, plus three things: `LongLoraCallback` is added when the callbacks lack one; the
    LongLoRA card from `model_cards/` states what the trainer knows (data, steps, last evaluation): in
    every directory `save_model` writes (checkpoints included; a card someone wrote is kept), and from
    `create_model_card` (what `trainer.push_to_hub()` calls) instead of TRL's card; and over a quantized
    base (QLoRA) the LoRA+ embeddings and norms stay in float32 (`keep_lora_plus_in_float32`). Everything
    else, arguments included, is `SFTTrainer`'s.

    Args:
        *args: `SFTTrainer`'s (model, args, data, `peft_config`: a `LongLoraConfig` for LongLoRA).
        callbacks: `SFTTrainer`'s; a `LongLoraCallback` is added when none is among them.
        **kwargs: `SFTTrainer`'s.
    """

    def __init__(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        if not any(isinstance(c, LongLoraCallback) or c is LongLoraCallback for c in callbacks):
            callbacks.append(LongLoraCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, LongLoraCallback):
                callback.trainer_writes_card = True
        if self.is_fsdp_enabled:  # FSDP flattens each wrapped block into one dtype: leave TRL's uniform bfloat16
            if getattr(getattr(self.model, "config", None), "quantization_config", None) is not None:
                logger.warning(
                    "LongLoRA: QLoRA under FSDP trains the LoRA+ embedding and norms in bfloat16 (TRL's cast; FSDP "
                    "needs one dtype per wrapped block): at small learning rates (the paper's 2e-5) their updates "
                    "round away."
                )
        else:
            keep_lora_plus_in_float32(self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`SFTTrainer.save_model` (checkpoints too), then the LongLoRA card with what the trainer knows so far
        in the saved directory, unless a card someone wrote is there."""
        super().save_model(output_dir, _internal_call=_internal_call)
        self._write_card(output_dir or self.args.output_dir, overwrite=False)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        if longlora_config_of(self.model) is None:  # not a LongLoRA model: TRL's card
            return super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags, **kwargs)
        return self._write_card(
            self.args.output_dir, overwrite=True, model_name=model_name, dataset_name=dataset_name, tags=tags
        )

    def _write_card(self, directory: str, *, overwrite: bool, model_name=None, dataset_name=None, tags=None):
        """The LongLoRA card in `directory`, from the main process, with the data, steps and last evaluation."""
        config = longlora_config_of(self.model)
        if config is None or not self.is_world_process_zero():
            return None
        args = self.args
        rows = (
            len(self.train_dataset)
            if self.train_dataset is not None and hasattr(self.train_dataset, "__len__")
            else None
        )
        data = dataset_name or (f"{rows:,} training rows (source not recorded)" if rows else None)
        steps = None
        if self.state.global_step:
            steps = (
                f"{self.state.global_step} (per-device batch {args.per_device_train_batch_size}, gradient "
                f"accumulation {args.gradient_accumulation_steps}, {args.world_size} process(es), lr "
                f"{args.learning_rate:g}, max_length {getattr(args, 'max_length', None)})"
            )
        evaluations = [entry for entry in self.state.log_history if "eval_loss" in entry]
        evaluation = None
        if evaluations:
            last = evaluations[-1]
            evaluation = (
                f"Evaluation during training (dense attention, rows of up to {getattr(args, 'max_length', None)} "
                f"tokens): loss {last['eval_loss']:.4f}, perplexity {math.exp(last['eval_loss']):.2f} at step "
                f"{last.get('step')}."
            )
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        extra_tags += [*(getattr(self.model, "model_tags", None) or []), *self._tag_names]
        repo = self.hub_model_id or model_name
        return write_model_card(
            directory,
            config,
            overwrite=overwrite,
            repo_or_path=repo or os.path.basename(os.path.abspath(args.output_dir)),
            training_data=data,
            training_steps=steps,
            evaluation=evaluation,
            tags=extra_tags,
        )


def keep_lora_plus_in_float32(model) -> list[str]:
    """Over a quantized base, put the trainable LoRA+ weights (`modules_to_save`: the input embedding and the
    norms) back in float32; returns their names. TRL's `SFTTrainer` casts every trainable weight of a quantized
    model to bfloat16 (the QLoRA paper's choice for LoRA's A and B). A norm's weights lie near 1, where bfloat16
    values are 2**-7 apart: updates of the paper's learning rate (2e-5) round away and the norm never trains.
    A copy TRL only cast (it equals its original module's weight rounded to bfloat16) gets the original's float32
    values back; any other (an adapter loaded trained) is cast up. LoRA's A and B stay as TRL sets them.
    Not under FSDP, which needs one dtype per wrapped block. In float32 the embedding's output, and so the
    residual stream, is float32 too (more activation memory than a bfloat16 stream; not measured on a GPU
    here). Removed when TRL exempts `modules_to_save` from that cast."""
    from peft.utils.other import ModulesToSaveWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "quantization_config", None) is None or longlora_config_of(model) is None:
        return []
    kept = []
    for wrapper_name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        originals = dict(wrapper.original_module.named_parameters())
        for adapter, copy in wrapper.modules_to_save.items():
            for name, parameter in copy.named_parameters():
                if not parameter.requires_grad or parameter.dtype == torch.float32:
                    continue
                original = originals.get(name)
                if (
                    original is not None
                    and original.dtype == torch.float32
                    and torch.equal(parameter.data, original.data.to(parameter.dtype))
                ):
                    parameter.data = original.data.detach().clone()
                else:
                    parameter.data = parameter.data.float()
                kept.append(f"{wrapper_name}.modules_to_save.{adapter}.{name}")
    return kept
