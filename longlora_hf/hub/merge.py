"""`longlora-hf merge`: a LongLoRA (or LoRA) adapter merged into its base, saved as a plain model and
optionally published on the Hub."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..model_card import write_model_card
from ..paths import MANIFEST, check_model_source, is_out_of_space, out_of_space, output_directory
from ..tuner import check_adapter_fits, longlora_config_of
from .push import hub_errors, upload_folder


def _weight_bytes(model) -> int:
    """The bytes of `model`'s weights as saved (a tensor tied to another counted once)."""
    tensors = {(t.untyped_storage().data_ptr(), t.storage_offset()): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def merge_adapter(
    base: str,
    adapter: str,
    out: str | Path,
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
) -> Path:
    """Load `base` (safetensors, no remote code) and `adapter` (position interpolation restored), merge
    LoRA and the LoRA+ modules, and save a model plain transformers loads with its default attention,
    with a model card. `push_to_hub`: a repo id to upload it to (created if missing; the token is the
    one `huggingface_hub` finds: `HF_TOKEN` or `hf auth login`).

    `out` is written by the rule of `longlora_hf.paths`: never the base or the adapter directory (or one
    inside or around them), files it did not write are replaced only with `overwrite`, and an interrupted
    merge leaves the earlier `out` or none. The base, the adapter and `out` are checked before loading, and
    the adapter against the base before it is applied. A full disk ends in `OutOfSpaceError` (the space the
    merged model needs and the space free), a failed push in `HubError` (the merged model stays in `out`):
    each an OSError of one line.

    Args:
        base (`str`):
            The base model: a local directory or Hub id.
        adapter (`str`):
            The adapter: a local directory or Hub id.
        out (`str` or `Path`):
            The directory to write the merged model to.
        push_to_hub (`str`, *optional*):
            As above.
        private (`bool`, defaults to False):
            Create the Hub repo as private.
        overwrite (`bool`, defaults to False):
            Replace files in `out` that this command did not write.

    Returns:
        `Path`: `out`.

    Raises:
        `ValueError` or `FileNotFoundError`: when the base, the adapter or `out` is refused before loading, or the
            adapter does not fit the base.
        `FileExistsError`: when `out` holds files this command did not write and `overwrite` is False.
        `OutOfSpaceError`, `HubError`: as above.
    """
    check_model_source(base, "--base", "model")
    check_model_source(adapter, "--adapter", "adapter")
    needed = None
    try:
        with output_directory(out, "--out", {"--base": base, "--adapter": adapter}, overwrite) as partial:
            model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
            check_adapter_fits(model, adapter, "--adapter")
            peft_model = PeftModel.from_pretrained(model, adapter)
            config = longlora_config_of(peft_model)
            merged = peft_model.merge_and_unload()
            needed = _weight_bytes(merged)
            merged.save_pretrained(partial, safe_serialization=True)
            for source in (adapter, base):
                try:
                    AutoTokenizer.from_pretrained(source).save_pretrained(partial)
                    break
                except (OSError, ValueError) as error:
                    if is_out_of_space(error):  # a tokenizer that would not fit: not one that is missing
                        raise
                    continue
            if config is not None:
                write_model_card(
                    partial,
                    config,
                    overwrite=True,
                    base_model=base,
                    merged=True,
                    repo_or_path=push_to_hub or str(out),
                    training_data=f"see the adapter, {adapter}",
                )
    except Exception as error:
        if not is_out_of_space(error):
            raise
        raise out_of_space(Path(out).expanduser().resolve(), "--out", needed, "the merged model") from error
    out = Path(out)
    if push_to_hub:
        saved = out.expanduser().resolve()
        later = f"hf upload {push_to_hub} {saved} --exclude {MANIFEST}"
        kept = f"the merged model is saved in {saved} (to push it later: {later})"
        with hub_errors(push_to_hub, kept=kept):
            message = f"Merge LongLoRA adapter {adapter} into {base}"
            upload_folder(out, push_to_hub, private=private, commit_message=message)
    return out
