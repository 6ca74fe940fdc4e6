"""The bundled demo model and `longlora-hf demo` (a short run: 2 steps, one document, a stride of 2048)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from longlora_hf.demo import ASSETS
from longlora_hf.demo.corpus import LONG_DOCUMENT_CHARS, read_split, split_documents
from longlora_hf.demo.run import run_demo, training_rows
from longlora_hf.metrics.perplexity import token_stream


def test_the_bundled_model_is_a_small_llama_trained_at_256_tokens_in_safetensors():
    model = AutoModelForCausalLM.from_pretrained(ASSETS, use_safetensors=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ASSETS)
    assert model.config.model_type == "llama" and model.config.max_position_embeddings == 256
    assert model.config.rope_parameters["rope_type"] == "default"
    assert len(tokenizer) == model.config.vocab_size
    assert (ASSETS / "model.safetensors").stat().st_size < 20 * 2**20
    assert not list(ASSETS.glob("*.bin"))


def test_held_out_documents_are_not_fine_tuning_documents():
    held_out = {d["name"] for d in read_split(ASSETS / "eval.jsonl.gz")}
    fine_tuning = {d["name"] for d in read_split(ASSETS / "finetune.jsonl.gz")}
    assert held_out and fine_tuning and not held_out & fine_tuning
    card = (ASSETS / "MODEL_CARD.md").read_text()
    assert all(f"- {name}" in card for name in held_out)


def test_the_corpus_split_is_disjoint_and_deterministic():
    documents = {f"doc{i}.rst.txt": "x" * (LONG_DOCUMENT_CHARS + i if i % 2 else 100) for i in range(120)}
    split = split_documents(documents)
    names = [set(split[k]) for k in ("pretrain", "finetune", "eval")]
    assert sum(map(len, names)) == 120 and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert all(len(documents[n]) >= LONG_DOCUMENT_CHARS for n in split["eval"] + split["finetune"])
    assert split_documents(dict(reversed(list(documents.items())))) == split


def test_the_demo_fine_tunes_on_the_token_stream_the_perplexity_metric_reads():
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ASSETS)
    stream = token_stream(tokenizer, [d["text"] for d in read_split(ASSETS / "finetune.jsonl.gz")]).tolist()
    rows = training_rows(tokenizer, 2048)
    assert rows == [stream[start : start + 2048] for start in range(0, len(stream) - 2048 + 1, 2048)]


@pytest.mark.slow_demo
def test_a_short_demo_run_writes_the_table_plot_and_an_adapter_with_its_card(tmp_path):
    results = run_demo(tmp_path, steps=2, passkey_trials=1, eval_documents=1, stride=2048)
    assert list(results["rows"]) == ["base", "PI only", "LongLoRA"]
    assert results["lengths"] == [256, 512, 1024, 2048]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["rows"]["LongLoRA"]["perplexity"]) == {"256", "512", "1024", "2048"}
    assert (tmp_path / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LONGLORA" and config["position_interpolation_factor"] == 8.0
    from huggingface_hub import ModelCard

    card = ModelCard((tmp_path / "adapter" / "README.md").read_text())
    assert card.data.tags == ["longlora", "lora", "peft"] and card.data.library_name == "peft"
    assert (
        card.data.pipeline_tag == "text-generation" and card.data.base_model is None
    )  # a local path: no Hub metadata
    for fact in (
        "| Original context | 256 tokens |",
        "| Target context | 2048 tokens |",
        "giving linear (factor 8, original 256",
        "| S2-Attn group size ratio | 0.25 (training only",
        "| Base model | `longlora_hf/demo/assets",
        "input embedding, every normalization layer",
        "| LongLoRA |",
    ):
        assert fact in card.text
