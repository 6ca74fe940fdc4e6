"""`longlora-hf merge`: a LongLoRA (or LoRA) adapter merged into its base, saved as a plain model and
optionally published on the Hub."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..model_card import write_model_card
from ..tuner import longlora_config_of
from .push import upload_folder


def merge_adapter(base: str, adapter: str, out: str | Path, push_to_hub: str | None = None, private: bool = False) -> Path:
    """Load `base` (safetensors, no remote code) and `adapter` (position interpolation restored), merge
    LoRA and the LoRA+ modules, and save a model plain transformers loads with its default attention,
    with a model card. `push_to_hub`: a repo id to upload it to (created if missing; the token is the
    one `huggingface_hub` finds: `HF_TOKEN` or `hf auth login`)."""
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    peft_model = PeftModel.from_pretrained(model, adapter)
    config = longlora_config_of(peft_model)
    merged = peft_model.merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out, safe_serialization=True)
    for source in (adapter, base):
        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(out)
            break
        except (OSError, ValueError):
            continue
    if config is not None:
        write_model_card(out, config, overwrite=True, base_model=base, repo_or_path=push_to_hub or str(out), merged=True,
                         training_data=f"see the adapter, {adapter}")
    if push_to_hub:
        upload_folder(out, push_to_hub, private=private, commit_message=f"Merge LongLoRA adapter {adapter} into {base}")
    return out
