"""Passkey retrieval (Landmark Attention; the reference repository's passkey script): a random 5-digit
key hidden at a chosen depth in filler text, recovered by greedy decoding. Accuracy by context length
and depth, seeded."""

from __future__ import annotations

import random
import re

import torch
from tqdm.auto import tqdm

from .perplexity import check_context_lengths


TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def information_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] (a fraction of the filler before the key); got {depth!r}.")


def check_passkey_options(depths, trials: int) -> list[float]:
    """The depths as a list, and the number of trials, as `passkey_retrieval` takes them."""
    depths = list(depths)
    if not depths:
        raise ValueError("depths is empty: pass e.g. depths=[0.0, 0.5, 1.0].")
    for depth in depths:
        _check_depth(depth)
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer; got {trials!r}.")
    return depths


def passkey_prompt(tokenizer, context_length: int, depth: float, key: str) -> str:
    """A prompt of about `context_length` tokens with the key's line after `depth` of the filler.

    Args:
        tokenizer:
            The tokenizer of the model under test; it measures the prompt.
        context_length (`int`):
            The prompt's length to aim at, in tokens.
        depth (`float`):
            The fraction of the filler before the key's line, in [0, 1].
        key (`str`):
            The pass key.

    Returns:
        `str`: the prompt, ending with the question.

    Raises:
        `ValueError`: when `depth` is outside [0, 1].
    """
    _check_depth(depth)
    fixed = len(tokenizer("\n".join([TASK, information_line(key), QUESTION]), add_special_tokens=False)["input_ids"])
    per_sentence = len(tokenizer(" " + FILLER, add_special_tokens=False)["input_ids"])
    sentences = max(0, (context_length - fixed) // per_sentence)
    before = round(sentences * depth)
    return "\n".join(
        [TASK, " ".join([FILLER] * before), information_line(key), " ".join([FILLER] * (sentences - before)), QUESTION]
    )


def greedy_continuation(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> str:
    """The text `model` generates greedily after the prompt `ids` (one row), special tokens left out."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def answer_is_correct(continuation: str, key: str) -> bool:
    """The first number the model produces is the key."""
    found = re.search(r"\d+", continuation)
    return found is not None and found.group() == key


@torch.no_grad()
def passkey_retrieval(
    model,
    tokenizer,
    context_lengths,
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Accuracy[context_length][depth] over `trials` random keys each (greedy decoding, dense attention).

    Args:
        model (`transformers.PreTrainedModel`):
            A causal LM; put in evaluation mode for the run, then back in its mode.
        tokenizer:
            Its tokenizer.
        context_lengths:
            The prompt lengths, in tokens.
        depths (defaults to `(0.0, 0.25, 0.5, 0.75, 1.0)`):
            The fractions of the filler before the key, each in [0, 1].
        trials (`int`, defaults to 5):
            Random keys per context length and depth.
        seed (`int`, defaults to 0):
            Seed of the keys.
        progress (`bool`, defaults to True):
            Show a progress bar.

    Returns:
        `dict`: `accuracy` ({context_length: {depth: fraction correct}}) and `trials` (one record per key: its
        context length, depth, key, answer, whether it was correct, and the prompt's tokens).

    Raises:
        `ValueError`: for an empty or invalid list of context lengths or depths, or `trials` under 1, before any
            generation.
    """
    # Checked before the first prompt, not when a bad value's turn comes after minutes of generation.
    context_lengths = check_context_lengths(context_lengths)
    depths = check_passkey_options(depths, trials)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    accuracy, records = {}, []
    try:
        cases = [(length, depth) for length in context_lengths for depth in depths]
        for length, depth in tqdm(cases, desc="passkey", disable=not progress):
            correct = 0
            for _ in range(trials):
                key = str(rng.randint(10000, 99999))
                ids = tokenizer(passkey_prompt(tokenizer, length, depth, key), return_tensors="pt")["input_ids"].to(
                    device
                )
                answer_tokens = len(tokenizer(" " + key, add_special_tokens=False)["input_ids"])
                continuation = greedy_continuation(model, tokenizer, ids, answer_tokens + 2)
                ok = answer_is_correct(continuation, key)
                correct += ok
                records.append(
                    {
                        "context_length": length,
                        "depth": depth,
                        "key": key,
                        "answer": continuation,
                        "correct": ok,
                        "prompt_tokens": ids.shape[1],
                    }
                )
            accuracy.setdefault(length, {})[depth] = correct / trials
    finally:
        model.train(was_training)
    return {"accuracy": accuracy, "trials": records}
