"""`longlora-hf merge`: a LongLoRA (or LoRA) adapter merged into its base, saved as a plain model and
optionally published on the Hub."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..model_card import write_model_card
from ..paths import check_model_source, output_directory
from ..tuner import check_adapter_fits, longlora_config_of
from .push import upload_folder


def merge_adapter(
    base: str, adapter: str, out: str | Path, push_to_hub: str | None = None, private: bool = False, overwrite: bool = False
) -> Path:
    """Load `base` (safetensors, no remote code) and `adapter` (position interpolation restored), merge
    LoRA and the LoRA+ modules, and save a model plain transformers loads with its default attention,
    with a model card. `push_to_hub`: a repo id to upload it to (created if missing; the token is the
    one `huggingface_hub` finds: `HF_TOKEN` or `hf auth login`).

    `out` is written by the rule of `longlora_hf.paths`: never the base or the adapter directory (or one
    inside or around them), files it did not write are replaced only with `overwrite`, and an interrupted
    merge leaves the earlier `out` or none. The base, the adapter and `out` are checked before loading, and
    the adapter against the base before it is applied."""
    check_model_source(base, "--base", "model")
    check_model_source(adapter, "--adapter", "adapter")
    with output_directory(out, "--out", {"--base": base, "--adapter": adapter}, overwrite) as partial:
        model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
        check_adapter_fits(model, adapter, "--adapter")
        peft_model = PeftModel.from_pretrained(model, adapter)
        config = longlora_config_of(peft_model)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(partial, safe_serialization=True)
        for source in (adapter, base):
            try:
                AutoTokenizer.from_pretrained(source).save_pretrained(partial)
                break
            except (OSError, ValueError):
                continue
        if config is not None:
            write_model_card(partial, config, overwrite=True, base_model=base, repo_or_path=push_to_hub or str(out), merged=True,
                             training_data=f"see the adapter, {adapter}")
    out = Path(out)
    if push_to_hub:
        upload_folder(out, push_to_hub, private=private, commit_message=f"Merge LongLoRA adapter {adapter} into {base}")
    return out
