"""`LongLoraCallback` in TRL's SFTTrainer: the train-start report and the set-ups it refuses."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_model
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from longlora_hf import LongLoraConfig
from longlora_hf.training import LongLoraCallback


def sft_trainer(tmp_path, tokenizer, peft_config, callback, max_length=128, steps=2):
    rows = torch.randint(4, 128, (4, max_length), generator=torch.Generator().manual_seed(0)).tolist()
    arguments = SFTConfig(
        output_dir=str(tmp_path), max_length=max_length, per_device_train_batch_size=1, max_steps=steps,
        learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
    )
    return SFTTrainer(
        model=tiny_model("llama"), args=arguments, train_dataset=Dataset.from_dict({"input_ids": rows}),
        processing_class=tokenizer, peft_config=peft_config, callbacks=[callback],
    )


def test_the_report_says_what_runs_and_is_logged_once(tmp_path, tiny_tokenizer, caplog):
    callback = LongLoraCallback()
    trainer = sft_trainer(tmp_path, tiny_tokenizer, LongLoraConfig(target_context_length=512), callback)
    with caplog.at_level(logging.WARNING, logger="longlora_hf.training.callback"):
        trainer.train()
    report = callback.report
    assert (report.s2_attention, report.max_length, report.group_size, report.groups) == (True, 128, 32, 4)
    assert (report.context_length, report.position_interpolation_factor) == (512, 2.0)
    assert report.trainable["embeddings"] == 128 * 32 and report.trainable["norms"] == 5 * 32
    assert report.trainable["LoRA"] == 2 * (8 * (32 + 32) * 2 + 8 * (32 + 16) * 2) and "other" not in report.trainable
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LongLoRA:")]
    assert messages == [str(report)] and "4 groups" in messages[0]


def test_s2_required_but_not_running_stops_training(tmp_path, tiny_tokenizer):
    trainer = sft_trainer(tmp_path, tiny_tokenizer, LoraConfig(r=4, target_modules=["q_proj"]), LongLoraCallback(require_s2=True))
    with pytest.raises(ValueError, match="S2-Attn was requested, but the model runs attn_implementation='sdpa'"):
        trainer.train()


def test_groups_smaller_than_two_tokens_stop_training(tmp_path, tiny_tokenizer):
    trainer = sft_trainer(tmp_path, tiny_tokenizer, LongLoraConfig(group_size_ratio=0.01), LongLoraCallback())
    with pytest.raises(ValueError, match="S2-Attn groups of 1 tokens at max_length 128"):
        trainer.train()


def test_a_max_length_beyond_the_interpolated_context_stops_training(tmp_path, tiny_tokenizer):
    trainer = sft_trainer(tmp_path, tiny_tokenizer, LongLoraConfig(target_context_length=256), LongLoraCallback(), max_length=300)
    with pytest.raises(ValueError, match="max_length 300 is beyond the model's context of 256 tokens.*target_context_length"):
        trainer.train()
