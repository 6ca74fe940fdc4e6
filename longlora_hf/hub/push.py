"""Publishing a LongLoRA adapter with its model card."""

from __future__ import annotations

import tempfile

from huggingface_hub import HfApi

from ..model_card import write_model_card
from ..paths import MANIFEST
from ..tuner import longlora_config_of


def push_adapter_to_hub(model, repo_id: str, *, private: bool = False, commit_message: str = "Upload LongLoRA adapter",
                        **card_facts) -> str:
    """Upload `model`'s adapter (config, safetensors weights: LoRA, embeddings, norms) and the LongLoRA model
    card to `repo_id`, creating the repo if needed; returns the commit URL. `card_facts` go to
    `render_model_card` (training_data, training_steps, evaluation, ...).

    Use this rather than `model.push_to_hub(repo_id)` when you want the LongLoRA card: transformers'
    `push_to_hub` (which PEFT models inherit) replaces the saved README with a generic card on a repo's
    first push. The token is the one `huggingface_hub` finds (`HF_TOKEN` or `hf auth login`)."""
    config = longlora_config_of(model)
    if config is None:
        found = getattr(model, "active_peft_config", None)
        adapter = f"a {type(found).__name__}" if found is not None else f"missing ({type(model).__name__} is not a PEFT model)"
        raise ValueError(f"push_adapter_to_hub publishes LongLoRA adapters; this model's adapter is {adapter}. "
                         "Use model.push_to_hub(repo_id) for it.")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        write_model_card(folder, config, overwrite=True, repo_or_path=repo_id, **card_facts)
        return upload_folder(folder, repo_id, private=private, commit_message=commit_message)


def upload_folder(folder, repo_id: str, *, private: bool, commit_message: str) -> str:
    """Create `repo_id` if it is missing and upload `folder` to it in one commit; returns the commit URL."""
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    # the manifest says what a command wrote in this directory; it means nothing on the Hub
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, ignore_patterns=[MANIFEST]).commit_url
