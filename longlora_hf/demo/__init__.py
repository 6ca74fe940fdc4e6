"""The demo: a small bundled Llama, its corpus, and the script that pretrained it."""

from pathlib import Path


ASSETS = Path(__file__).parent / "assets"
"""The bundled model (safetensors), tokenizer (tokenizer.json), fine-tuning and held-out documents."""
