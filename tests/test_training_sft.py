"""`longlora-hf sft` / `python -m longlora_hf.sft`: TRL's SFT script with LongLoRA, single process and launched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl
from peft import AutoPeftModelForCausalLM

from longlora_hf.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "trainer_configs/recipes/tiny_cpu.yaml"


def test_the_tiny_recipe_trains_a_longlora_adapter_through_trls_script(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    get_peft_config, sft_trainer = trl.get_peft_config, trl.SFTTrainer
    assert cli_main(["sft", "--config", RECIPE, "--output_dir", str(tmp_path), "--max_steps", "2", "--disable_tqdm", "true"]) == 0
    assert (trl.get_peft_config, trl.SFTTrainer) == (get_peft_config, sft_trainer)  # TRL is left as it was
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LONGLORA" and config["position_interpolation_factor"] == 4.0
    assert config["target_context_length"] == 1024 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert model.get_base_model().config.max_position_embeddings == 1024
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_longlora_flags_override_the_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["sft", "--config", RECIPE, "--output_dir", str(tmp_path), "--max_steps", "1", "--disable_tqdm", "true",
            "--group_size_ratio", "0.5", "--lora_r", "4", "--trainable_embeddings", "false"]
    assert cli_main(args) == 0
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["group_size_ratio"], config["r"], config["trainable_embeddings"]) == (0.5, 4, False)
    assert "embed_tokens" not in config["modules_to_save"]


def test_an_unknown_flag_is_refused(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="--group_size_ration"):
        cli_main(["sft", "--config", RECIPE, "--group_size_ration", "0.5"])


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["cpu_deepspeed_zero2", "cpu_deepspeed_zero3", "cpu_ddp"])
def test_accelerate_launch_with_two_processes_trains_and_saves_a_loadable_adapter(launcher, tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"tests/configs/{launcher}.yaml",
        "-m", "longlora_hf.sft", "--config", RECIPE, "--output_dir", str(tmp_path), "--max_steps", "3",
        "--logging_steps", "1", "--disable_tqdm", "true",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("LongLoRA: S2-Attn on") + result.stdout.count("LongLoRA: S2-Attn on") == 1  # main process only
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 4096, (1, 64), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(ids).logits).all()
    trained = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert trained and any(p.abs().sum() > 0 for p in trained.values())  # LoRA B starts at zero: it was trained
