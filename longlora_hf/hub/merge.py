"""`longlora-hf merge`: a LongLoRA (or LoRA) adapter merged into its base, saved as a plain model."""

from __future__ import annotations

from pathlib import Path


def merge_adapter(base: str, adapter: str, out: str | Path) -> Path:
    """Load `base` (safetensors, no remote code) and `adapter` (position interpolation restored), merge
    LoRA and the LoRA+ modules, and save a model plain transformers loads with its default attention."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out, safe_serialization=True)
    for source in (adapter, base):
        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(out)
            break
        except (OSError, ValueError):
            continue
    return out
