"""`LongLoraCallback` in TRL's SFTTrainer: the train-start report, the set-ups it refuses, dense evaluation
inside training; `LongLoraSFTTrainer`'s model card."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import transformers
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from transformers import TrainerControl, TrainerState, TrainingArguments
from trl import SFTConfig, SFTTrainer

from longlora_hf import LongLoraConfig
from longlora_hf.training import LongLoraCallback, LongLoraSFTTrainer
from support.helpers import tiny_model


def sft_trainer(tmp_path, tokenizer, peft_config, callback, max_length=128, steps=2, **arguments):
    rows = torch.randint(4, 128, (4, max_length), generator=torch.Generator().manual_seed(0)).tolist()
    arguments = SFTConfig(
        output_dir=str(tmp_path),
        max_length=max_length,
        per_device_train_batch_size=1,
        max_steps=steps,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        **arguments,
    )
    return SFTTrainer(
        model=tiny_model("llama"),
        args=arguments,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
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


def test_trls_trainer_with_its_fused_loss_trains_the_tiled_mlp_as_the_untiled_one(tmp_path, tiny_tokenizer):
    """SFTTrainer's own path (its fused LM head, gradient checkpointing) with MLP tiles of 16 tokens: the report says
    so, and the losses and trained weights are those of the same run untiled."""
    runs = {}
    for tile in (None, 16):
        callback = LongLoraCallback()
        config = LongLoraConfig(target_context_length=512, mlp_tile_size=tile)
        trainer = sft_trainer(tmp_path / str(tile), tiny_tokenizer, config, callback, gradient_checkpointing=True)
        trainer.train()
        assert trainer.model.get_base_model().is_gradient_checkpointing
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[tile] = (callback.report, losses, weights)
    (untiled, expected_losses, expected), (tiled, losses, weights) = runs[None], runs[16]
    assert untiled.mlp_tiles is None and tiled.mlp_tiles == (16, 2) and "MLP in tiles of 16 tokens" in str(tiled)
    assert len(losses) == 2 and losses == pytest.approx(expected_losses, rel=1e-5)
    for name, weight in expected.items():
        torch.testing.assert_close(weights[name], weight, rtol=1e-4, atol=1e-6, msg=name)


# Architectures whose input embedding or norms are named without "embed"/"norm", beside two that are not.
NAMED_OTHERWISE = {
    "gpt-j": lambda: transformers.GPTJForCausalLM(
        transformers.GPTJConfig(  # norms ln_1, ln_f
            vocab_size=128,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            n_positions=256,
            bos_token_id=2,
            eos_token_id=3,
        )
    ),
    "falcon": lambda: transformers.FalconForCausalLM(
        transformers.FalconConfig(  # final norm ln_f
            vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
        )
    ),
    "ctrl": lambda: transformers.CTRLLMHeadModel(
        transformers.CTRLConfig(  # input embedding w
            vocab_size=128, n_embd=32, n_layer=2, n_head=4, dff=64
        )
    ),
    "llama": lambda: tiny_model("llama"),
    "gpt-neox": lambda: tiny_model("gpt-neox"),
}


@pytest.mark.parametrize("arch", NAMED_OTHERWISE)
def test_the_report_counts_lora_the_input_embedding_and_the_norms_by_module_whatever_their_names(arch, tmp_path):
    base = NAMED_OTHERWISE[arch]()
    embedding = base.get_input_embeddings().weight.numel()
    model = get_peft_model(base, LongLoraConfig(use_s2_attn=False))
    callback = LongLoraCallback()
    callback.on_train_begin(
        TrainingArguments(str(tmp_path), report_to=[], use_cpu=True), TrainerState(), TrainerControl(), model=model
    )
    trainable = callback.report.trainable
    assert set(trainable) == {"LoRA", "embeddings", "norms"}  # LongLoRA trains nothing else
    assert trainable["LoRA"] == sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    assert trainable["embeddings"] == embedding
    assert sum(trainable.values()) == model.get_nb_trainable_parameters()[0]


def test_s2_required_but_not_running_stops_training(tmp_path, tiny_tokenizer):
    trainer = sft_trainer(
        tmp_path, tiny_tokenizer, LoraConfig(r=4, target_modules=["q_proj"]), LongLoraCallback(require_s2=True)
    )
    with pytest.raises(ValueError, match="S2-Attn was requested, but the model runs attn_implementation='sdpa'"):
        trainer.train()


def test_groups_smaller_than_two_tokens_stop_training(tmp_path, tiny_tokenizer):
    trainer = sft_trainer(tmp_path, tiny_tokenizer, LongLoraConfig(group_size_ratio=0.01), LongLoraCallback())
    with pytest.raises(ValueError, match="S2-Attn groups of 1 tokens at max_length 128"):
        trainer.train()


def test_a_max_length_beyond_the_interpolated_context_stops_training(tmp_path, tiny_tokenizer):
    trainer = sft_trainer(
        tmp_path, tiny_tokenizer, LongLoraConfig(target_context_length=256), LongLoraCallback(), max_length=300
    )
    with pytest.raises(
        ValueError, match="max_length 300 is beyond the model's context of 256 tokens.*target_context_length"
    ):
        trainer.train()


def test_evaluation_inside_training_is_dense_and_training_resumes_s2(tmp_path, tiny_tokenizer, monkeypatch):
    from longlora_hf.attention import s2

    phase, s2_calls = ["train"], {"train": 0, "eval": 0}
    original = s2.s2_layout
    monkeypatch.setattr(
        s2, "s2_layout", lambda *a, **k: s2_calls.__setitem__(phase[0], s2_calls[phase[0]] + 1) or original(*a, **k)
    )
    rows = torch.randint(4, 128, (4, 128), generator=torch.Generator().manual_seed(0)).tolist()
    arguments = SFTConfig(
        output_dir=str(tmp_path),
        max_length=128,
        per_device_train_batch_size=1,
        max_steps=3,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        bf16=False,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=2,
    )
    trainer = LongLoraSFTTrainer(
        model=tiny_model("llama"),
        args=arguments,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        eval_dataset=Dataset.from_dict({"input_ids": rows[:2]}),
        processing_class=tiny_tokenizer,
        peft_config=LongLoraConfig(target_context_length=256),
    )
    evaluation_loop = trainer.evaluation_loop

    def evaluating(*args, **kwargs):
        phase[0] = "eval"
        try:
            return evaluation_loop(*args, **kwargs)
        finally:
            phase[0] = "train"

    trainer.evaluation_loop = evaluating
    trainer.train()
    assert s2_calls["eval"] == 0  # three evaluations, none through S2
    assert s2_calls["train"] >= 3  # every training step after each evaluation ran S2 again
    # the evaluation loss is the dense loss: the same model switched to plain sdpa gives it
    eval_loss = trainer.evaluate()["eval_loss"]
    model = trainer.model
    model.get_base_model().set_attn_implementation("sdpa")
    model.eval()
    batch = torch.tensor(rows[:2])
    with torch.no_grad():
        dense = model(input_ids=batch, labels=batch).loss.item()
    assert abs(eval_loss - dense) < 1e-5, (eval_loss, dense)
    # and the card the trainer writes for push_to_hub says so
    card = ModelCard.load(trainer.create_model_card())
    assert (
        f"perplexity {math.exp(eval_loss):.2f}" in card.text
        and "| Training steps | 3 (per-device batch 1" in card.text
    )
    assert {"longlora", "trl", "sft"} <= set(card.data.tags) and "LongLoraCallback" not in card.text


@pytest.mark.parametrize("given", [[], [LongLoraCallback()]], ids=["none-given", "one-given"])
def test_the_longlora_sft_trainer_has_the_callback_exactly_once(tmp_path, tiny_tokenizer, given):
    arguments = SFTConfig(output_dir=str(tmp_path), max_length=64, report_to=[], use_cpu=True, bf16=False)
    trainer = LongLoraSFTTrainer(
        model=tiny_model("llama"),
        args=arguments,
        train_dataset=Dataset.from_dict({"input_ids": [[5, 6, 7]]}),
        processing_class=tiny_tokenizer,
        peft_config=LongLoraConfig(),
        callbacks=given,
    )
    assert sum(isinstance(c, LongLoraCallback) for c in trainer.callback_handler.callbacks) == 1


@pytest.mark.parametrize(
    "peft_config, main_process, warns",
    [
        (LongLoraConfig(), True, True),
        (LongLoraConfig(), False, False),
        (LoraConfig(r=4, target_modules=["q_proj"]), True, False),
    ],
    ids=["longlora-main-process", "longlora-other-process", "plain-lora"],
)
def test_a_plain_trainers_push_of_a_longlora_adapter_says_once_how_to_publish_the_longlora_card(
    tmp_path, tiny_tokenizer, caplog, peft_config, main_process, warns
):
    """`Trainer.push_to_hub` and checkpoint pushes start with `on_push_begin`; the card they publish is the
    trainer's."""
    trainer = sft_trainer(tmp_path, tiny_tokenizer, peft_config, LongLoraCallback())
    trainer.state.is_world_process_zero = main_process
    with caplog.at_level(logging.WARNING, logger="longlora_hf.training.callback"):
        for _ in range(2):
            trainer.callback_handler.on_push_begin(trainer.args, trainer.state, trainer.control)
    said = [
        r.getMessage() for r in caplog.records if "this push publishes the trainer's own model card" in r.getMessage()
    ]
    assert len(said) == (1 if warns else 0)


def test_every_directory_the_longlora_sft_trainer_saves_has_the_card_with_its_training(tmp_path, tiny_tokenizer):
    rows = torch.randint(4, 128, (4, 64), generator=torch.Generator().manual_seed(0)).tolist()
    arguments = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_length=64,
        per_device_train_batch_size=1,
        max_steps=2,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        bf16=False,
    )
    trainer = LongLoraSFTTrainer(
        model=tiny_model("llama"),
        args=arguments,
        train_dataset=Dataset.from_dict({"input_ids": rows}),
        processing_class=tiny_tokenizer,
        peft_config=LongLoraConfig(target_context_length=256),
    )
    trainer.train()
    trainer.save_model()
    for directory, steps in (
        (tmp_path / "run" / "checkpoint-1", 1),
        (tmp_path / "run" / "checkpoint-2", 2),
        (tmp_path / "run", 2),
    ):
        card = ModelCard.load(directory / "README.md")
        assert f"| Training steps | {steps} (per-device batch 1, gradient accumulation 1" in card.text, directory
        assert (
            "| Training data | 4 training rows (source not recorded) |" in card.text and "longlora" in card.data.tags
        )
    # a card someone wrote (the mark line deleted) is kept by later saves
    own = tmp_path / "mine"
    own.mkdir()
    (own / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nHand-written.\n")
    trainer.save_model(str(own))
    assert "Hand-written." in (own / "README.md").read_text() and (own / "adapter_model.safetensors").exists()


def test_a_model_that_names_no_input_embedding_is_counted_without_one():
    """`get_input_embeddings` raising NotImplementedError (transformers' default) is not an error at train start."""
    from longlora_hf.training.callback import _trainable_by_kind

    class NoNamedEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(8, 4)
            self.norm = torch.nn.LayerNorm(4)

        def get_input_embeddings(self):
            raise NotImplementedError

    assert _trainable_by_kind(NoNamedEmbedding()) == {"norms": 8, "other": 32}
