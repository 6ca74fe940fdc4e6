"""A model that ties its output head to its input embedding (SmolLM2, Gemma 3, Qwen2.5-0.5B, Llama-3.2-1B): LoRA+
trains the embedding, and the adapter saves the shared weight once and loads it back tied, with every loader."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longlora_hf import LongLoraConfig
from support.helpers import tiny_model


VOCAB, HIDDEN = 4096, 32  # the embedding dominates the adapter, as in SmolLM2 (vocabulary 49152, hidden 576)
EMBEDDING_BYTES = VOCAB * HIDDEN * 4
EMBEDDING_KEY, HEAD_KEY = "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"


def tied_base(**overrides):
    return tiny_model("llama", tie_word_embeddings=True, vocab_size=VOCAB, **overrides)


def ids(n=40):
    return torch.randint(4, VOCAB, (2, n), generator=torch.Generator().manual_seed(2))


def train_one_step(model):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids(), labels=ids()).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return model.eval()


def weights_in(adapter_dir) -> dict[str, tuple[int, ...]]:
    """The adapter file's tensors other than LoRA's factors: name -> shape."""
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys() if ".lora_" not in name}


def head_and_embedding(model):
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.get_output_embeddings().weight, base.get_input_embeddings().weight


def assert_tied(model):
    head, embedding = head_and_embedding(model)
    assert head is embedding and head.data_ptr() == embedding.data_ptr()


def assert_saved_once(adapter_dir):
    saved = weights_in(adapter_dir)
    assert saved[EMBEDDING_KEY] == (VOCAB, HIDDEN)
    assert [name for name, shape in saved.items() if shape == (VOCAB, HIDDEN)] == [EMBEDDING_KEY]
    assert not any("lm_head" in name for name in saved), sorted(saved)
    # one embedding's worth of bytes (two copies, as PEFT's ModulesToSaveWrapper writes, would be over twice that)
    assert (adapter_dir / "adapter_model.safetensors").stat().st_size < 1.1 * EMBEDDING_BYTES


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """A base on disk, a trained tied adapter saved for it, and the adapter's logits."""
    root = tmp_path_factory.mktemp("tied")
    tied_base().save_pretrained(root / "base")
    model = get_peft_model(tied_base(), LongLoraConfig(target_context_length=1024))
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    train_one_step(model)
    assert_tied(model)
    model.save_pretrained(root / "adapter")
    with torch.no_grad():
        expected = model(ids()).logits
    embedding = head_and_embedding(model)[1].detach().clone()
    return root / "base", root / "adapter", expected, embedding


def base_from(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir)


def peft_load_adapter(base_dir, adapter_dir):
    model = get_peft_model(base_from(base_dir), LongLoraConfig(target_context_length=1024), adapter_name="other")
    model.load_adapter(adapter_dir, adapter_name="loaded")
    model.set_adapter("loaded")
    return model


def transformers_load_adapter(base_dir, adapter_dir):
    model = base_from(base_dir)
    model.load_adapter(str(adapter_dir))  # assigns the loaded tensors: a tie by shared parameter would break
    return model


LOADERS = {
    "PeftModel.from_pretrained": lambda base_dir, adapter_dir: PeftModel.from_pretrained(
        base_from(base_dir), adapter_dir
    ),
    "low_cpu_mem_usage": lambda base_dir, adapter_dir: PeftModel.from_pretrained(
        base_from(base_dir), adapter_dir, low_cpu_mem_usage=True
    ),
    "AutoPeftModelForCausalLM": lambda base_dir, adapter_dir: AutoPeftModelForCausalLM.from_pretrained(adapter_dir),
    "PeftModel.load_adapter": peft_load_adapter,
    "transformers load_adapter": transformers_load_adapter,
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_tied_adapter_saves_the_shared_weight_once_and_reloads_tied(trained_adapter, loader):
    base_dir, adapter_dir, expected, embedding = trained_adapter
    assert_saved_once(adapter_dir)
    model = LOADERS[loader](base_dir, adapter_dir).eval()
    assert_tied(model)
    assert torch.equal(head_and_embedding(model)[0], embedding)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "loader", ["PeftModel.from_pretrained", "AutoPeftModelForCausalLM", "transformers load_adapter"]
)
def test_an_adapter_saved_with_both_copies_still_loads_tied_and_saves_once(trained_adapter, loader, tmp_path):
    """Adapters saved before the tied weight was saved once hold `lm_head.weight` beside `embed_tokens.weight`."""
    base_dir, adapter_dir, expected, embedding = trained_adapter
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", old)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    weights[HEAD_KEY] = weights[EMBEDDING_KEY].clone()
    save_file(weights, old / "adapter_model.safetensors", metadata={"format": "pt"})
    assert {EMBEDDING_KEY, HEAD_KEY} <= set(weights_in(old))

    model = LOADERS[loader](base_dir, old).eval()
    assert_tied(model)
    assert torch.equal(head_and_embedding(model)[0], embedding)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, expected, atol=1e-6, rtol=0)
    if isinstance(model, PeftModel):
        model.save_pretrained(tmp_path / "again")
        assert_saved_once(tmp_path / "again")
        result = model.load_adapter(old, adapter_name="twice")  # PEFT's load result: no key left over
        assert not result.unexpected_keys and not result.missing_keys, result


def test_a_reloaded_tied_adapter_trains_tied_and_merges_into_a_tied_model(trained_adapter, tmp_path):
    base_dir, adapter_dir, _, embedding = trained_adapter
    model = PeftModel.from_pretrained(base_from(base_dir), adapter_dir, is_trainable=True)
    assert_tied(model)
    head = model.get_base_model().lm_head
    assert not list(head.modules_to_save["default"].parameters())  # no weight of its own: the embedding's is trained
    train_one_step(model)
    assert_tied(model)
    trained_embedding = head_and_embedding(model)[1].detach().clone()
    assert not torch.equal(trained_embedding, embedding)
    model.save_pretrained(tmp_path / "retrained")
    assert_saved_once(tmp_path / "retrained")
    with torch.no_grad():
        expected = model(ids()).logits

    merged = model.merge_and_unload()
    assert type(merged.lm_head) is torch.nn.Linear
    assert merged.lm_head.weight is merged.get_input_embeddings().weight
    assert torch.equal(merged.lm_head.weight, trained_embedding)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = base_from(tmp_path / "merged").eval()
    assert reloaded.config.tie_word_embeddings and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids()).logits, expected, atol=1e-5, rtol=0)


def test_an_untied_model_saves_its_own_head_and_embedding(tmp_path):
    """A guard: a head the adapter trains on its own (tie_word_embeddings=False) is saved and loaded as PEFT does."""
    base = tiny_model("llama", tie_word_embeddings=False, vocab_size=VOCAB)
    model = get_peft_model(base, LongLoraConfig(modules_to_save=["lm_head"], use_s2_attn=False))
    train_one_step(model)
    head, embedding = head_and_embedding(model)
    assert head is not embedding and not torch.equal(head, embedding)
    model.save_pretrained(tmp_path / "adapter")
    assert {EMBEDDING_KEY, HEAD_KEY} <= set(weights_in(tmp_path / "adapter"))
    with torch.no_grad():
        expected = model(ids()).logits
    reloaded = PeftModel.from_pretrained(
        tiny_model("llama", tie_word_embeddings=False, vocab_size=VOCAB), tmp_path / "adapter"
    ).eval()
    head, embedding = head_and_embedding(reloaded)
    assert head is not embedding
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids()).logits, expected, atol=1e-6, rtol=0)
