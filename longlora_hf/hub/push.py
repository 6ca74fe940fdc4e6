"""Publishing a LongLoRA adapter with its model card, and what a command says when the Hub fails it."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import HfApi

from ..model_card import write_model_card
from ..paths import MANIFEST
from ..tuner import longlora_config_of


def push_adapter_to_hub(
    model, repo_id: str, *, private: bool = False, commit_message: str = "Upload LongLoRA adapter", **card_facts
) -> str:
    """Upload `model`'s adapter (config, safetensors weights: LoRA, embeddings, norms) and the LongLoRA model
    card to `repo_id`, creating the repo if needed; returns the commit URL. `card_facts` go to
    `render_model_card` (training_data, training_steps, evaluation, ...).

    Use this rather than `model.push_to_hub(repo_id)` when you want the LongLoRA card: transformers'
    `push_to_hub` (which PEFT models inherit) replaces the saved README with a generic card on a repo's
    first push. The token is the one `huggingface_hub` finds (`HF_TOKEN` or `hf auth login`).

    Args:
        model (`peft.PeftModel`):
            A model whose active adapter is a LongLoRA adapter.
        repo_id (`str`):
            The Hub repo to upload to (`owner/name`); created when missing.
        private (`bool`, defaults to False):
            Create the repo as private (an existing repo keeps its visibility).
        commit_message (`str`, defaults to "Upload LongLoRA adapter"):
            The message of the upload's commit.
        **card_facts:
            As above.

    Returns:
        `str`: the URL of the commit.

    Raises:
        `ValueError`: when the model's active adapter is not a LongLoRA adapter (or the model is not a PEFT
            model). Errors of the Hub are `huggingface_hub`'s.
    """
    config = longlora_config_of(model)
    if config is None:
        found = getattr(model, "active_peft_config", None)
        adapter = (
            f"a {type(found).__name__}"
            if found is not None
            else f"missing ({type(model).__name__} is not a PEFT model)"
        )
        raise ValueError(
            f"push_adapter_to_hub publishes LongLoRA adapters; this model's adapter is {adapter}. "
            "Use model.push_to_hub(repo_id) for it."
        )
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        write_model_card(folder, config, overwrite=True, repo_or_path=repo_id, **card_facts)
        return upload_folder(folder, repo_id, private=private, commit_message=commit_message)


def upload_folder(folder, repo_id: str, *, private: bool, commit_message: str) -> str:
    """Create `repo_id` if it is missing and upload `folder` to it in one commit; returns the commit URL."""
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    # the manifest says what a command wrote in this directory; it means nothing on the Hub
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=commit_message, ignore_patterns=[MANIFEST]
    ).commit_url


class HubError(OSError):
    """A push the Hub refused or could not be reached for, in one line: the endpoint, the repo, what happened, what
    was kept locally and what to do. An OSError, so a command ends with that line and exit code 2."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The errors of a request that got no answer (no connection, a timeout), for the HTTP clients
    huggingface_hub has used: httpx2 (huggingface_hub 2), httpx (1.x), requests (0.x); and the built-in ones."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "ConnectionError"),
        ("requests", "Timeout"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _one_line(text: str) -> str:
    """`text` on one line, without the token huggingface_hub would send (nor anything shaped like a token)."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "***")
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}", "hf_***", " ".join(text.split()))


@contextmanager
def hub_errors(repo_id: str | None, kept: str | None = None, action: str | None = None) -> Iterator[None]:
    """Turn a failure of the Hub calls made inside into `HubError`: one line naming the Hub endpoint, `action`
    (default "the push to `repo_id`"), what went wrong (unreachable, offline mode, or the Hub's refusal with its
    reason) and `kept`, what is saved locally (e.g. "the merged model is saved in /out"). The token is never
    part of it. Other errors pass unchanged.

        with hub_errors("alice/model", kept="the trained adapter is saved in out/"):
            trainer.push_to_hub()
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    endpoint = constants.ENDPOINT
    action = action or (f"the push to {repo_id}" if repo_id else "the push")
    kept = f"; {kept}" if kept else ""
    try:
        yield
    except OfflineModeIsEnabled as error:
        raise HubError(
            f"HF_HUB_OFFLINE is set, so {action} did not happen (the Hub, {endpoint}, is not contacted)"
            f"{kept}. Unset HF_HUB_OFFLINE to reach it."
        ) from error
    except HfHubHTTPError as error:
        reason = _one_line(str(error)).rstrip(".")
        raise HubError(
            f"the Hub refused {action} ({endpoint}): {reason}{kept}. Check the repo id and your token "
            "(`hf auth login`, or HF_TOKEN)."
        ) from error
    except _transport_errors() as error:
        reason = _one_line(f"{type(error).__name__}: {error}")
        raise HubError(
            f"cannot reach the Hub at {endpoint} ({reason}); {action} did not happen{kept}. Check the "
            "network and HF_ENDPOINT, then try again."
        ) from error
