"""`longlora-hf convert-reference` and `longlora-hf merge`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from conftest import shadow_longlora_hf, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model

from longlora_hf import LongLoraConfig
from longlora_hf.cli import main as cli_main


def ids():
    return torch.randint(4, 128, (2, 40), generator=torch.Generator().manual_seed(2))


def perturb(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def write_reference_checkpoint(tmp_path):
    """A checkpoint in the reference layout: a LoRA adapter (.bin) plus trainable_params.bin of embeddings and norms."""
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    perturb(model)
    checkpoint = tmp_path / "reference"
    model.save_pretrained(checkpoint, safe_serialization=False)
    generator = torch.Generator().manual_seed(3)
    trainable = {
        f"base_model.model.{name}": value + 0.05 * torch.randn(value.shape, generator=generator)
        for name, value in tiny_model("llama").state_dict().items()
        if "embed" in name or "norm" in name
    }
    torch.save(trainable, checkpoint / "trainable_params.bin")
    return base_dir, checkpoint, trainable


def reference_way_logits(base_dir, checkpoint, trainable, context):
    """The reference code's loading: RoPE scaled for the context, trainable_params into the base, then the adapter."""
    config = transformers.AutoConfig.from_pretrained(base_dir)
    config.rope_parameters = {"rope_type": "linear", "factor": float(-(-context // config.max_position_embeddings)), "rope_theta": 10000.0}
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, config=config)
    missing, unexpected = base.load_state_dict({k.removeprefix("base_model.model."): v for k, v in trainable.items()}, strict=False)
    assert not unexpected
    return PeftModel.from_pretrained(base, checkpoint).eval()(ids()).logits


def test_a_converted_reference_checkpoint_gives_the_reference_logits(tmp_path):
    base_dir, checkpoint, trainable = write_reference_checkpoint(tmp_path)
    assert cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "converted"), "--target-context-length", "1024"]) == 0
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LONGLORA" and config["target_context_length"] == 1024
    converted = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "converted").eval()
    expected = reference_way_logits(base_dir, checkpoint, trainable, 1024)
    torch.testing.assert_close(converted(ids()).logits, expected, atol=1e-5, rtol=0)


def test_files_that_are_not_what_they_claim_are_refused(tmp_path, capsys):
    _, checkpoint, _ = write_reference_checkpoint(tmp_path)
    (checkpoint / "trainable_params.bin").write_bytes(b"not a checkpoint")
    assert cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err
    torch.save({"model.layers.0.mlp.up_proj.weight": torch.zeros(2)}, checkpoint / "trainable_params.bin")
    assert cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    assert "neither embeddings nor norms" in capsys.readouterr().err

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model.norm.weight": Payload()}, checkpoint / "trainable_params.bin")
    assert cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    assert "weights_only loading refused it" in capsys.readouterr().err


def test_merge_writes_a_model_plain_transformers_loads_with_the_same_logits(tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    model = get_peft_model(tiny_model("llama"), LongLoraConfig(target_context_length=1024))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    expected = model.eval()(ids()).logits
    assert cli_main(["merge", "--base", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    torch.save({"ids": ids(), "expected": expected}, tmp_path / "check.pt")
    script = textwrap.dedent(f"""
        try:
            import longlora_hf
            raise SystemExit("longlora_hf must not be importable")
        except ImportError:
            pass
        import torch, transformers
        check = torch.load({str(tmp_path / "check.pt")!r}, weights_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r})
        assert model.config._attn_implementation == "sdpa" and model.config.rope_parameters["factor"] == 4.0
        torch.testing.assert_close(model(check["ids"]).logits, check["expected"], atol=1e-5, rtol=0)
    """)
    env = {**os.environ, "PYTHONPATH": shadow_longlora_hf(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda t: t.__setitem__("base_model.model.model.norm.weight", torch.ones(31)), r"model.norm.weight has shape \(31,\); a norm weight is a vector of the hidden size \[32\]"),
        (lambda t: t.__setitem__("base_model.model.model.embed_tokens.weight", torch.ones(128)), r"embed_tokens.weight has shape \(128,\); an embedding is a \(vocab, hidden\) matrix"),
    ],
    ids=["norm-width", "embedding-not-a-matrix"],
)
def test_tensors_of_the_wrong_shape_are_refused_with_the_name_and_shape(tmp_path, capsys, damage, message):
    _, checkpoint, trainable = write_reference_checkpoint(tmp_path)
    damage(trainable)
    torch.save(trainable, checkpoint / "trainable_params.bin")
    assert cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_lora_factors_of_another_rank_are_refused(tmp_path, capsys):
    _, checkpoint, _ = write_reference_checkpoint(tmp_path)
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    (checkpoint / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    assert cli_main(["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    assert re.search(r"lora_A\.weight has shape \(8, 32\); lora_A of rank r=4", capsys.readouterr().err)


def test_with_base_every_tensor_is_checked_against_the_base_model(tmp_path, capsys):
    base_dir, checkpoint, trainable = write_reference_checkpoint(tmp_path)
    other = tmp_path / "other_base"
    tiny_model("llama", vocab_size=64).save_pretrained(other)
    args = ["convert-reference", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--base"]
    assert cli_main([*args, str(other)]) == 2
    assert re.search(r"embed_tokens.weight has shape \(128, 32\); .*other_base has \(64, 32\)", capsys.readouterr().err)
    assert cli_main([*args, str(base_dir)]) == 0
