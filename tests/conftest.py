"""Shared fixtures (a tiny tokenizer). Tiny models and the helpers the tests share are in `support/helpers.py`.

Nothing is downloaded: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import longlora_hf  # noqa: E402,F401  (registers "s2")


def pytest_configure(config):
    """Each pytest-xdist worker gets its share of the cores, and so do the processes its tests launch (they inherit
    OMP_NUM_THREADS): with torch's default of a thread per core, `pytest -n 2` on 2 cores would run 4 threads on 2
    cores. An OMP_NUM_THREADS the user set is kept."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The tests that launch processes or run the demo take a minute or more each; most others take a second. They
    run first, so that `pytest -n 2 --dist worksteal` ends both workers together instead of one long test running
    alone at the end."""
    items.sort(key=lambda item: not (item.get_closest_marker("distributed") or item.get_closest_marker("slow_demo")))


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
