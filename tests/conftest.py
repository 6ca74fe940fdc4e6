"""Shared fixtures (a tiny tokenizer). Tiny models and the helpers the tests share are in `support/helpers.py`.

Nothing is downloaded: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import transformers  # noqa: E402

import longlora_hf  # noqa: E402,F401  (registers "s2")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer trained here on made-up text, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = [f"w{i}" for i in range(90)] + ["the", "passkey", "is", "remember", "it", "."] + list("0123456789")
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"])
    tokenizer.train_from_iterator([" ".join(words)] * 2, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
