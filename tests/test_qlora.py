"""QLoRA: LongLoRA over a 4-bit (NF4) base with bitsandbytes on the CPU, through Python and `longlora-hf sft`.

LoRA+ over a quantized base: bitsandbytes quantizes the linear layers only; the input embedding and the norms
stay in full precision and train as `modules_to_save`, as over a full-precision base. The adapter holds them
in float32, so it loads over the 4-bit base and over the full-precision one, and merges into a plain model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from longlora_hf import LongLoraConfig
from longlora_hf.cli import main as cli_main


bnb = pytest.importorskip("bitsandbytes")  # the test extra installs it; `pip install .` alone does not

ROOT = Path(__file__).resolve().parents[1]
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A small Llama-3.1-shaped model (GQA, llama3 RoPE off: plain) whose linear widths are multiples of 32, as
    bitsandbytes' CPU inference kernel needs (real models' are; the bundled demo model's MLP, 688, is not)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("qlora") / "base"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_longlora_trains_over_a_4bit_base_and_its_adapter_loads_over_both_bases_and_merges(base_dir, tmp_path):
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32)
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, LongLoraConfig(target_context_length=512))
    assert base.config._attn_implementation == "s2"
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    lora_plus = {name: p for name, p in trainable.items() if "modules_to_save" in name}
    assert any("embed_tokens" in name for name in lora_plus) and any("norm" in name for name in lora_plus)
    assert all(p.dtype == torch.float32 and not isinstance(p, bnb.nn.Params4bit) for p in lora_plus.values())

    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    ids = torch.randint(0, 512, (1, 512), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.weight"].dtype == torch.float32

    probe = torch.randint(0, 512, (1, 96), generator=torch.Generator().manual_seed(1))
    trained = logits(model, probe)
    over_4bit = logits(
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=NF4, dtype=torch.float32),
            tmp_path / "adapter",
        ),
        probe,
    )
    over_full = logits(
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), tmp_path / "adapter"
        ),
        probe,
    )
    torch.testing.assert_close(over_4bit, trained, atol=1e-5, rtol=0)  # the same quantized weights
    # over the full-precision base: the NF4 rounding the adapter was trained over is gone (measured, stated in the
    # README)
    quantization_gap = (over_full - trained).abs().max()
    assert 1e-4 < quantization_gap < 0.5 * trained.abs().max(), quantization_gap

    assert (
        cli_main(
            [
                "merge",
                "--base",
                str(base_dir),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    merged_logits = logits(merged, probe)
    torch.testing.assert_close(merged_logits, over_full, atol=1e-4, rtol=0)
    print(
        f"QLoRA adapter: over the 4-bit base vs as trained {(over_4bit - trained).abs().max():.3g}; over the "
        f"full-precision base vs as trained {quantization_gap:.3g} (logits up to {trained.abs().max():.3g}); merged "
        f"vs over the full-precision base {(merged_logits - over_full).abs().max():.3g}"
    )


def test_sft_load_in_4bit_trains_longlora_over_a_4bit_base_with_the_lora_plus_weights_in_float32(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(ROOT)
    args = [
        "sft",
        "--config",
        "trainer_configs/recipes/tiny_cpu.yaml",
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--disable_tqdm",
        "true",
        "--load_in_4bit",
        "true",
        "--learning_rate",
        "2e-5",
    ]
    with caplog.at_level("WARNING", logger="longlora_hf.training.callback"):
        assert cli_main(args) == 0
    assert "base quantized: bitsandbytes 4-bit nf4 (compute float32)" in caplog.text
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LONGLORA" and "embed_tokens" in config["modules_to_save"]
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.weight"].dtype == torch.float32
    # the norms trained at the paper's learning rate: TRL casts a quantized model's trainable weights to bfloat16,
    # where a norm weight near 1 cannot take a step of 2e-5 and stays where it started; kept in float32, it moves
    from longlora_hf.demo import ASSETS

    start = load_file(ASSETS / "model.safetensors")["model.norm.weight"]
    moved = (saved["base_model.model.model.norm.weight"].float() - start).abs().max()
    assert 1e-5 < moved < 1e-3, moved


def test_without_bitsandbytes_load_in_4bit_is_refused_with_the_extra_to_install(tmp_path):
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('bitsandbytes is not installed here')\n")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "longlora_hf.cli",
            "sft",
            "--config",
            "trainer_configs/recipes/tiny_cpu.yaml",
            "--output_dir",
            str(tmp_path / "out"),
            "--load_in_4bit",
            "true",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert (
        "longlora-hf sft: error: --load_in_4bit quantizes the base model with bitsandbytes, which cannot be imported"
        in result.stderr
    )
    assert "pip install 'longlora-hf[qlora]'" in result.stderr and not (tmp_path / "out").exists()
