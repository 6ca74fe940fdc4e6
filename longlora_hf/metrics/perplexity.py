"""Perplexity by evaluation context length: the LongLoRA protocol and the usual strided one.

"longlora" (the reference repository's eval.py, after Landmark Attention): the token stream is cut
into windows of the evaluation length starting every `stride` (256) tokens, the last start dropped;
each window's loss is the mean cross-entropy of its next-token predictions; perplexity is
exp(mean window loss).

"strided" (the usual sliding-window perplexity): windows of the evaluation length every `stride`
tokens, each scoring only the tokens not scored by an earlier window; perplexity is exp(total
negative log-likelihood / scored tokens).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..position_interpolation import context_length

PROTOCOLS = ("longlora", "strided")
BEYOND_CONTEXT = ("warn", "error")


def load_model_and_tokenizer(model, tokenizer=None, adapter: str | None = None, dtype=None, device=None):
    """A model object is used as is; a path or Hub id is loaded (safetensors, no remote code), with an
    optional adapter (LongLoRA adapters restore their position interpolation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, (str, Path)):
        path = str(model)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", use_safetensors=True)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                tokenizer = None  # token ids need none; texts say so when they need it
    if adapter is not None:
        from peft import PeftModel

        from ..tuner import check_adapter_fits

        check_adapter_fits(model, adapter)  # a local adapter made for another base is refused, not half-loaded
        model = PeftModel.from_pretrained(model, str(adapter))
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Texts as one stream of token ids: each text's ids without special tokens, then the end-of-sequence
    token (if the tokenizer has one), as the reference's tokenized data (Landmark Attention's
    `encode_ordinary(text)` + end-of-text per document). The one builder of token streams: the metric
    evaluates on it, and the demo pretrains and fine-tunes on it."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def read_token_file(path: str | Path) -> torch.Tensor:
    """A flat file of uint16 token ids, as the reference evaluation reads (`np.memmap(..., dtype=uint16)`)."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    return torch.from_numpy(np.asarray(data, dtype=np.int64))


def longlora_window_starts(n_tokens: int, context_length: int, stride: int = 256) -> list[int]:
    """Window starts of the reference evaluation: range(0, n - L, stride), without its last start."""
    starts = list(range(0, n_tokens - context_length, stride))
    return starts[:-1]


def _model_context(model) -> int | None:
    config = getattr(model, "config", None)
    return context_length(config) if config is not None else None


def check_context_lengths(context_lengths) -> list[int]:
    """The evaluation context lengths as a list; both metrics take them. A window needs one token to
    predict from and one to predict."""
    lengths = list(context_lengths)
    if not lengths:
        raise ValueError("context_lengths is empty: pass e.g. context_lengths=[2048, 4096].")
    for length in lengths:
        if not isinstance(length, int) or length < 2:
            raise ValueError(f"context lengths must be integers of at least 2 tokens; got {length!r}.")
    return lengths


def check_perplexity_options(protocol: str, stride: int, batch_size: int, beyond_context: str) -> None:
    """The options of `compute_perplexity` that need neither the model nor the data."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}; got {protocol!r}.")
    if beyond_context not in BEYOND_CONTEXT:
        raise ValueError(f"beyond_context must be one of {BEYOND_CONTEXT}; got {beyond_context!r}.")
    for name, value in (("stride", stride), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")


def _check_data_fits_model(model, stream: torch.Tensor, context_lengths: list[int], beyond_context: str) -> None:
    """The token ids are in the model's vocabulary, and each context length fits the data and the model."""
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is not None and stream.numel() and int(stream.max()) >= vocab_size:
        raise ValueError(
            f"The token ids go up to {int(stream.max())}, but the model's vocabulary has {vocab_size} tokens: "
            "the token file was made with another tokenizer. Re-tokenize the data with this model's tokenizer."
        )
    limit = _model_context(model)
    for length in context_lengths:
        if length + 1 > stream.numel():
            raise ValueError(
                f"context length {length} needs more than {length} tokens, but the data has {stream.numel()}. "
                "Pass longer texts or drop this length."
            )
        if limit is not None and length > limit:
            message = (
                f"context length {length} is beyond the model's context of {limit} tokens "
                "(after any position extension; README: 'Position extension, scheme by scheme')."
            )
            if beyond_context == "error":
                raise ValueError(message + " Pass beyond_context='warn' to evaluate it anyway.")
            warnings.warn(message, stacklevel=3)


@torch.no_grad()
def _window_nll_sums_and_counts(model, windows: torch.Tensor, labels: torch.Tensor | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window: (sum of next-token negative log-likelihoods, number of scored tokens)."""
    device = next(model.parameters()).device
    sums, counts = [], []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        target = ids if labels is None else labels[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].double()
        target = target[:, 1:]
        scored = target != -100
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target.masked_fill(~scored, 0), reduction="none"
        )
        sums.append((nll * scored).sum(-1).cpu())
        counts.append(scored.sum(-1).cpu())
    return torch.cat(sums).double(), torch.cat(counts)


def perplexity_at(model, stream: torch.Tensor, context_length: int, protocol: str, stride: int, batch_size: int) -> dict:
    if protocol == "longlora":
        starts = longlora_window_starts(stream.numel(), context_length, stride)
        if not starts:
            raise ValueError(
                f"context length {context_length} leaves no evaluation window in {stream.numel()} tokens with "
                f"stride {stride} (the protocol needs more than {context_length + stride} tokens)."
            )
        windows = torch.stack([stream[s : s + context_length] for s in starts])
        sums, counts = _window_nll_sums_and_counts(model, windows, None, batch_size)
        loss = (sums / counts).mean().item()
        return {"perplexity": math.exp(loss), "loss": loss, "windows": len(starts), "tokens_scored": int(counts.sum())}
    nll_sums, token_counts, previous_end = [], [], 0
    for begin in range(0, stream.numel(), stride):
        end = min(begin + context_length, stream.numel())
        if end - begin < 2:
            break
        window = stream[begin:end]
        label = window.clone()
        label[: max(0, (end - begin) - (end - previous_end))] = -100
        sums, counts = _window_nll_sums_and_counts(model, window[None], label[None], 1)
        nll_sums.append(sums.item())
        token_counts.append(int(counts.item()))
        previous_end = end
        if end == stream.numel():
            break
    loss = sum(nll_sums) / sum(token_counts)
    return {"perplexity": math.exp(loss), "loss": loss, "windows": len(nll_sums), "tokens_scored": sum(token_counts)}


def compute_perplexity(
    model,
    tokenizer=None,
    predictions: list[str] | None = None,
    input_ids=None,
    token_file: str | Path | None = None,
    context_lengths=(2048,),
    protocol: str = "longlora",
    stride: int = 256,
    batch_size: int = 1,
    adapter: str | None = None,
    beyond_context: str = "warn",
    progress: bool = True,
) -> dict:
    """Perplexity of `model` at each evaluation context length, with dense attention and no gradients.

    Data: `predictions` (texts, joined into one token stream), `input_ids` (one sequence of ids), or
    `token_file` (flat uint16 ids). Returns `perplexities` (one per context length, in order),
    `mean_perplexity`, and `by_context_length` {length: {perplexity, loss, windows, tokens_scored}}.
    """
    # What needs neither the model nor the data is checked before a model path is loaded (minutes for a 7B).
    check_perplexity_options(protocol, stride, batch_size, beyond_context)
    context_lengths = check_context_lengths(context_lengths)
    if sum(x is not None for x in (predictions, input_ids, token_file)) != 1:
        raise ValueError("Pass exactly one of predictions (texts), input_ids or token_file.")
    if predictions is not None and not predictions:
        raise ValueError("predictions is empty: pass at least one text (or input_ids / token_file).")
    model, tokenizer = load_model_and_tokenizer(model, tokenizer, adapter)
    if predictions is not None:
        if tokenizer is None:
            raise ValueError("Texts need a tokenizer: pass tokenizer=..., or a model path that has one.")
        stream = token_stream(tokenizer, list(predictions))
    elif token_file is not None:
        stream = read_token_file(token_file)
    else:
        stream = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    _check_data_fits_model(model, stream, context_lengths, beyond_context)

    was_training = model.training
    model.eval()
    try:
        table = {}
        for length in tqdm(context_lengths, desc="perplexity", disable=not progress):
            table[length] = perplexity_at(model, stream, length, protocol, stride, batch_size)
    finally:
        model.train(was_training)
    perplexities = [table[length]["perplexity"] for length in context_lengths]
    return {
        "perplexities": perplexities,
        "mean_perplexity": float(np.mean(perplexities)),
        "by_context_length": table,
        "protocol": protocol,
        "stride": stride,
        "tokens": int(stream.numel()),
    }
