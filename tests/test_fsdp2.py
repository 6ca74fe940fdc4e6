"""LongLoRA under FSDP2 with two CPU processes: what can run on a CPU, since accelerate's FSDP route cannot.

accelerate sets its FSDP type only for accelerators, so `accelerate launch` with trainer_configs/accelerate/
fsdp.yaml on a CPU runs plain data parallelism, which `check_launch` refuses (tests/test_training_sft.py).
torch's FSDP2 itself runs on a CPU with gloo: tests/support/fsdp2_worker.py shards the LongLoRA model as accelerate's
FSDP2 plugin does (each decoder layer, then the root) and trains it; this compares it with one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM

from support.fsdp2_worker import LEARNING_RATE, STEPS, build, rows, train


ROOT = Path(__file__).resolve().parents[1]


def logits_of(adapter_dir: Path) -> torch.Tensor:
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    ids = torch.randint(4, 4096, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.distributed
def test_fsdp2_shards_longlora_and_saves_resumes_and_reloads_as_one_process_trains(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(ROOT / "tests" / "support" / "fsdp2_worker.py"),
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    # really sharded: each rank holds half of the trainable embedding's rows and of each norm
    assert facts["world_size"] == 2 and facts["embedding_placements"] == ["S(0)"]
    assert (
        facts["embedding_local_rows"] * 2 == facts["embedding_rows"] == 4096
        and facts["norm_local"] * 2 == facts["norm"]
    )

    # one process, both ranks' rows in each batch: FSDP averages the two ranks' gradients, one process the rows'
    single, optimizer = build(shard=False)
    data = rows()
    train(single, optimizer, range(STEPS), lambda step: data[step])
    single.save_pretrained(tmp_path / "single")
    reference = logits_of(tmp_path / "single")
    untrained = logits_of_base_with_position_interpolation()
    moved = (reference - untrained).norm()
    assert moved > 1.0
    for run in ("straight", "resumed"):
        saved = dict(
            __import__("safetensors.torch", fromlist=["load_file"]).load_file(
                tmp_path / run / "adapter_model.safetensors"
            )
        )
        assert saved["base_model.model.model.embed_tokens.weight"].shape == (4096, 256)  # saved whole, not a shard
        # tied embeddings: saved once, as the trained input embedding (the output head reads it when loaded)
        assert not any("lm_head" in name for name in saved), sorted(saved)
        difference = (logits_of(tmp_path / run) - reference).norm()
        assert difference < 1e-4 * moved, (run, difference, moved)
    torch.testing.assert_close(logits_of(tmp_path / "resumed"), logits_of(tmp_path / "straight"), atol=0, rtol=0)
    print(
        f"FSDP2 (2 processes) vs one process: {(logits_of(tmp_path / 'straight') - reference).abs().max():.3g} max "
        "per logit; resumed vs straight: "
        f"{(logits_of(tmp_path / 'resumed') - logits_of(tmp_path / 'straight')).abs().max():.3g}; "
        f"training moved the logits by {moved:.3g} (norm), lr {LEARNING_RATE}"
    )


def logits_of_base_with_position_interpolation() -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from longlora_hf.demo import ASSETS
    from longlora_hf.tuner import apply_position_interpolation

    base = AutoModelForCausalLM.from_pretrained(ASSETS).eval()
    apply_position_interpolation(base, 512)
    ids = torch.randint(4, 4096, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return base(ids).logits
