"""The LongLoRA model card: what it states, what it says when a fact is unknown, valid Hub metadata, and
where it is written without anyone asking (every adapter save) and where it is not (a card someone wrote)."""

from __future__ import annotations

import re

import pytest
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model

from longlora_hf import LongLoraConfig
from longlora_hf.hub import push_adapter_to_hub, render_model_card, write_model_card
from longlora_hf.model_card import GENERATED_MARK
from support.helpers import tiny_model


def trained_config(**overrides) -> LongLoraConfig:
    """A config as get_peft_model leaves it: original context and factor recorded."""
    model = get_peft_model(tiny_model("llama"), LongLoraConfig(target_context_length=512, **overrides))
    return model.peft_config["default"]


def test_a_card_with_nothing_known_about_training_says_so_and_is_valid_hub_yaml():
    card = ModelCard(render_model_card(trained_config(), base_model="org/base-7b"))
    assert card.data.base_model == "org/base-7b" and card.data.library_name == "peft"
    assert card.data.pipeline_tag == "text-generation" and card.data.tags == ["longlora", "lora", "peft"]
    for fact in (
        "| Base model | `org/base-7b` |",
        "| Original context | 256 tokens |",
        "| Target context | 512 tokens |",
        "| RoPE of the base model | default (theta 10000) |",
        "| Position extension | x2 over the base model's own scheme, giving linear (factor 2, original 256, theta "
        "10000) |",
        "| S2-Attn group size ratio | 0.25",
        "| Training data | not recorded |",
        "| Training steps | not recorded |",
        "Not evaluated yet",
        "longlora-hf eval",
        "path/to/this/model",
    ):
        assert fact in card.text, fact


def test_the_card_states_training_data_steps_evaluation_and_the_repo():
    evaluation = {"base": {"512": 30.1, "1024": float("nan")}, "LongLoRA": {"512": 12.345, "1024": 13.0}}
    text = render_model_card(
        trained_config(group_size=16, trainable_embeddings=False),
        base_model="org/base",
        repo_or_path="me/adapter",
        training_data="LongAlpaca-12k",
        training_steps=1000,
        evaluation=evaluation,
    )
    card = ModelCard(text)
    for fact in (
        "| Training data | LongAlpaca-12k |",
        "| Training steps | 1000 |",
        "| S2-Attn group size ratio | 16 tokens",
        "| model | 512 tokens | 1024 tokens |",
        "| base | 30.10 | - |",
        "| LongLoRA | 12.35 | 13.00 |",
        "LoRA (r=8, alpha=16) on k_proj, o_proj, q_proj, v_proj; every normalization layer |",
        'AutoPeftModelForCausalLM.from_pretrained("me/adapter")',
    ):
        assert fact in card.text, fact


@pytest.mark.parametrize("base", ["./local/checkpoint", "/abs/path/model", "not a repo id: really", None])
def test_a_base_that_is_not_a_hub_id_stays_out_of_the_metadata(base, tmp_path):
    card = ModelCard(render_model_card(trained_config(), base_model=base))
    assert card.data.base_model is None  # the Hub rejects base_model values that are not model ids
    assert (f"| Base model | `{base}` |" if base else "| Base model | not recorded |") in card.text


def test_a_merged_model_card_says_it_loads_without_longlora_hf():
    card = ModelCard(render_model_card(trained_config(), base_model="org/base", repo_or_path="me/merged", merged=True))
    assert card.data.library_name == "transformers" and "merged" in card.data.tags
    assert "no `longlora_hf` needed" in card.text and "import longlora_hf" not in card.text


def test_every_adapter_save_writes_the_longlora_card_in_place_of_peft_s_generic_one(tmp_path):
    model = get_peft_model(tiny_model("llama"), LongLoraConfig(target_context_length=512))
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert "longlora" in card.data.tags and "| Target context | 512 tokens |" in card.text
    assert "Model Card for Model ID" not in card.text


def test_a_card_someone_wrote_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nHand-written.\n")
    model = get_peft_model(tiny_model("llama"), LongLoraConfig(target_context_length=512))
    model.save_pretrained(tmp_path)
    assert "Hand-written." in (tmp_path / "README.md").read_text()
    assert write_model_card(tmp_path, model.peft_config["default"]) is None
    assert write_model_card(tmp_path, model.peft_config["default"], overwrite=True) == tmp_path / "README.md"
    assert "Hand-written." not in (tmp_path / "README.md").read_text()


def test_no_credential_reaches_the_card(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_cardSecret123")
    assert "hf_cardSecret123" not in render_model_card(trained_config(), base_model="org/base", repo_or_path="me/a")


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda: get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"])), "a LoraConfig"),
        (lambda: tiny_model("llama"), "missing (LlamaForCausalLM is not a PEFT model)"),
    ],
    ids=["plain-lora", "no-adapter"],
)
def test_push_adapter_to_hub_refuses_a_model_without_a_longlora_adapter_before_any_request(make, named):
    with pytest.raises(
        ValueError, match=re.escape(f"this model's adapter is {named}. Use model.push_to_hub(repo_id)")
    ):
        push_adapter_to_hub(make(), "alice/never-pushed")  # HF_HUB_OFFLINE=1: a request would fail differently


def test_a_card_this_package_wrote_is_rewritten_on_the_next_save_until_its_mark_is_deleted(tmp_path):
    model = get_peft_model(tiny_model("llama"), LongLoraConfig(target_context_length=512))
    model.save_pretrained(tmp_path)
    readme = tmp_path / "README.md"
    assert readme.read_text().count(GENERATED_MARK) == 1
    write_model_card(tmp_path, model.peft_config["default"], training_steps=7)
    assert "| Training steps | 7 |" in readme.read_text()  # a later save with more facts updates it
    readme.write_text(readme.read_text().replace(GENERATED_MARK, "") + "\nMy notes.\n")
    model.save_pretrained(tmp_path)
    assert "My notes." in readme.read_text() and "| Training steps | 7 |" in readme.read_text()
