"""Shared fixtures (a tiny tokenizer). Tiny models and the helpers the tests share are in `support/helpers.py`.

Nothing is downloaded: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each pytest-xdist worker gets its share of the cores, and so do the processes its tests launch (they inherit
# OMP_NUM_THREADS): with torch's default of a thread per core, `pytest -n 2` on 2 cores would run 4 threads on 2
# cores. xdist names the worker count before this file is imported; the controller has none and sets nothing, so an
# OMP_NUM_THREADS the user set is kept.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402
import transformers  # noqa: E402

import longlora_hf  # noqa: E402,F401  (registers "s2")


def pytest_collection_modifyitems(config, items):
    """The tests that launch processes or run the demo take a minute or more each; most others take a second. Their
    modules are queued first, each module whole (its module-scoped fixtures are built once), so that with
    `--dist worksteal` the worker that finishes the short tests takes over queued ones and both workers end together
    instead of one long test running alone at the end."""

    def long(item):
        return item.get_closest_marker("distributed") or item.get_closest_marker("slow_demo")

    def module(item):
        return item.nodeid.split("::")[0]

    modules_with_long_tests = {module(item) for item in items if long(item)}
    items.sort(key=lambda item: module(item) not in modules_with_long_tests)


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
