"""The main job after a plain `pip install` of the wheel, without extras: what a user gets from PyPI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
# The CPU build of torch, as the Makefile installs it (a bare requirement would pull a CUDA build).
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{command} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.mark.slow_demo
def test_the_demo_runs_from_a_wheel_without_extras_and_says_how_to_get_the_plot(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "outputs", "longlora_demo", "__pycache__"
        ),
    )
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ]
    )
    (wheel,) = (tmp_path / "dist").glob("longlora_hf-*.whl")
    venv = tmp_path / "venv"
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", TORCH_SPEC, str(wheel)])
    assert (
        run([str(python), "-c", "import importlib.util; print(importlib.util.find_spec('matplotlib'))"]).stdout.strip()
        == "None"
    )

    out = tmp_path / "demo"
    script = (
        "from longlora_hf.demo.run import run_demo; "
        f"run_demo({str(out)!r}, steps=2, passkey_trials=1, eval_documents=1, stride=2048)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = run([str(python), "-c", script], env=env, cwd=tmp_path)
    assert "matplotlib is not installed (`pip install 'longlora-hf[plots]'`" in result.stdout
    assert "perplexity on held-out documents" in result.stdout
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["rows"]) == {"base", "PI only", "LongLoRA"}
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "perplexity.png").exists()
