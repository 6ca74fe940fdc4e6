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

import inspect
import math
import time
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
    """Window starts of the reference evaluation: range(0, n - L, stride), without its last start.

    Args:
        n_tokens (`int`):
            The length n of the token stream.
        context_length (`int`):
            The window length L.
        stride (`int`, defaults to 256):
            Tokens between window starts.

    Returns:
        `list[int]`: the start of each window (empty when the stream is too short for one).
    """
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


# Positions whose logits exist at once while scoring (split across a batch's rows): the scoring memory is
# this many positions by the vocabulary, whatever the window.
SCORING_TOKENS = 1024


def _logit_transform(config):
    """What transformers' causal LMs do to the LM head's output before returning it as logits, from the
    config: Gemma 2/3's final soft-capping, Granite's `logits_scaling`, Cohere's `logit_scale`. Other
    transforms are caught by `_WindowScorer`'s check of the last position."""
    cap = getattr(config, "final_logit_softcapping", None)
    divisor = getattr(config, "logits_scaling", None)
    factor = getattr(config, "logit_scale", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        # The models' own operations, in their order and dtype, so that the logits agree bit for bit.
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if divisor is not None:
            logits = logits / divisor
        if factor is not None:
            logits = logits * factor
        return logits

    return transform


class _WindowScorer:
    """Sums of next-token negative log-likelihoods of batches of windows, with logits for at most
    `SCORING_TOKENS` positions at a time.

    A causal LM's full logits are window x vocabulary (16k tokens x 49k tokens: 3 GB in float32, twice that
    in float64), so the model is asked for the last position's logits only (`logits_to_keep=1`); the
    decoder's output is caught by a hook and projected by the LM head chunk by chunk. The last position,
    which no target needs, checks the route: its logits must equal the model's own, or the scorer warns
    and falls back to the model's full logits (still scored chunk by chunk, with no float64 copy)."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
        parameters = inspect.signature(base.forward).parameters
        self.no_cache = {"use_cache": False} if "use_cache" in parameters else {}  # no key/value cache to keep
        get_decoder, get_head = getattr(base, "get_decoder", None), getattr(base, "get_output_embeddings", None)
        self.decoder = get_decoder() if get_decoder is not None else None
        self.head = get_head() if get_head is not None else None
        self.transform = _logit_transform(getattr(base, "config", None))
        self.why_full_logits = None
        if "logits_to_keep" not in parameters:
            self.why_full_logits = "its forward takes no logits_to_keep"
        elif self.decoder is None or self.decoder is base or self.head is None:
            self.why_full_logits = "it has no separate decoder and output embeddings"
        if self.why_full_logits is not None:
            self._warn()

    def _warn(self) -> None:
        warnings.warn(
            f"Perplexity is scored from the model's full logits ({self.why_full_logits}): the memory of scoring "
            "grows with the window (window x vocabulary).",
            stacklevel=2,
        )

    def __call__(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of `ids` (batch, window): (sum of -log p(labels[t] | ids[:t]) over t >= 1 whose label is
        not -100, in float64; number of those t)."""
        ids = ids.to(self.device)
        if self.why_full_logits is None:
            hidden = self._decoder_output(ids)  # (batch, window, hidden), or None: route failed
            if hidden is not None:
                return _nll_sums(lambda begin, end: self.transform(self.head(hidden[:, begin:end])), labels)
            self._warn()
        logits = self.model(input_ids=ids, **self.no_cache).logits  # (batch, window, vocab)
        return _nll_sums(lambda begin, end: logits[:, begin:end], labels)

    def _decoder_output(self, ids: torch.Tensor) -> torch.Tensor | None:
        caught = []
        handle = self.decoder.register_forward_hook(lambda module, args, output: caught.append(output[0]))
        try:
            last = self.model(input_ids=ids, logits_to_keep=1, **self.no_cache).logits[:, -1]  # (batch, vocab)
        finally:
            handle.remove()
        if len(caught) != 1 or not torch.is_tensor(caught[0]) or caught[0].shape[:2] != ids.shape:
            self.why_full_logits = "its decoder's output is not one (batch, window, hidden) tensor"
            return None
        hidden = caught[0]
        ours = self.transform(self.head(hidden[:, -1:]))[:, -1]
        tolerance = 4 * torch.finfo(last.dtype).eps * last.abs().max().float()
        if ours.shape != last.shape or (ours.float() - last.float()).abs().max() > tolerance:
            self.why_full_logits = "its logits are not the LM head's projection of the decoder's output"
            return None
        return hidden


def _nll_sums(logits_between, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `labels` (batch, window): (float64 sum of next-token NLLs, scored tokens), from
    `logits_between(begin, end)` (batch, end - begin, vocab) for at most `SCORING_TOKENS` positions at a
    time; cross-entropy in float32 (float64 for a float64 model)."""
    batch, window = labels.shape
    step = max(1, SCORING_TOKENS // batch)
    sums = torch.zeros(batch, dtype=torch.float64)
    counts = torch.zeros(batch, dtype=torch.long)
    for begin in range(0, window - 1, step):
        end = min(begin + step, window - 1)
        logits = logits_between(begin, end)  # (batch, end - begin, vocab): predictions of labels[begin + 1 : end + 1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        target = labels[:, begin + 1 : end + 1].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # 0 where -100
        sums += nll.double().sum(-1).cpu()
        counts += (target != -100).sum(-1).cpu()
    return sums, counts


def evaluation_windows(n_tokens: int, context_length: int, protocol: str, stride: int) -> list[tuple[int, int, int]]:
    """Each window of `protocol` as (begin, end, first scored position in the window): known before any
    forward, so that the progress bar counts windows and a length that leaves none is refused up front."""
    if protocol == "longlora":
        starts = longlora_window_starts(n_tokens, context_length, stride)
        if not starts:
            raise ValueError(
                f"context length {context_length} leaves no evaluation window in {n_tokens} tokens with "
                f"stride {stride} (the protocol needs more than {context_length + stride} tokens)."
            )
        return [(start, start + context_length, 1) for start in starts]
    windows, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        if end - begin < 2:
            break
        windows.append((begin, end, max(1, previous_end - begin)))  # tokens before previous_end were scored
        previous_end = end
        if end == n_tokens:
            break
    return windows


class _Progress:
    """A bar that counts windows over all context lengths (a 16k window of a 7B model takes seconds, so a bar
    of context lengths sits at 0 for minutes), with the tokens per second so far."""

    def __init__(self, total_windows: int, enabled: bool):
        self.bar = tqdm(total=total_windows, desc="perplexity", unit="window", disable=not enabled)
        self.tokens, self.started = 0, time.perf_counter()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exception) -> None:
        self.bar.close()

    def at_length(self, length: int) -> None:
        self.bar.set_description(f"perplexity at {length}")

    def advance(self, windows: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        self.bar.update(windows)


def _batches(windows: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of one length, at most `batch_size` at a time (the strided protocol's last windows
    are shorter than the others)."""
    batches = []
    for window in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0][1] - last[0][0] == window[1] - window[0]:
            last.append(window)
        else:
            batches.append([window])
    return batches


@torch.no_grad()
def perplexity_at(
    scorer: _WindowScorer, stream: torch.Tensor, windows, protocol: str, batch_size: int, progress: _Progress
) -> dict:
    """Perplexity of `protocol` over `windows` (from `evaluation_windows`)."""
    sums, counts = [], []
    for batch in _batches(windows, batch_size):
        ids = torch.stack([stream[begin:end] for begin, end, _ in batch])  # (batch, window)
        labels = ids.clone()
        for row, (_, _, scored_from) in enumerate(batch):
            labels[row, :scored_from] = -100
        batch_sums, batch_counts = scorer(ids, labels)
        sums.append(batch_sums)
        counts.append(batch_counts)
        progress.advance(len(batch), ids.numel())
    sums, counts = torch.cat(sums), torch.cat(counts)
    loss = ((sums / counts).mean() if protocol == "longlora" else sums.sum() / counts.sum()).item()
    return {"perplexity": math.exp(loss), "loss": loss, "windows": len(windows), "tokens_scored": int(counts.sum())}


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
    `progress` shows a bar of the windows of all context lengths, with tokens per second. Scoring holds the
    logits of `SCORING_TOKENS` positions at a time, not of a whole window (see `_WindowScorer`).

    Args:
        model (`transformers.PreTrainedModel`, `str` or `Path`):
            A causal LM, or a local path or Hub id to load one from (safetensors, no remote code).
        tokenizer (*optional*):
            The tokenizer for `predictions`; loaded with a model path when not given.
        predictions (`list[str]`, *optional*):
            Texts to evaluate on.
        input_ids (*optional*):
            Token ids to evaluate on, flattened into one sequence.
        token_file (`str` or `Path`, *optional*):
            A flat file of uint16 token ids to evaluate on.
        context_lengths (defaults to `(2048,)`):
            The evaluation context lengths, in tokens.
        protocol (`str`, defaults to "longlora"):
            "longlora" or "strided" (this module's docstring).
        stride (`int`, defaults to 256):
            Tokens between window starts.
        batch_size (`int`, defaults to 1):
            Windows per forward pass.
        adapter (`str`, *optional*):
            A PEFT adapter to load on the model (LongLoRA adapters restore their position interpolation).
        beyond_context (`str`, defaults to "warn"):
            A context length beyond the model's context: "warn" evaluates it with a warning, "error" refuses it.
        progress (`bool`, defaults to True):
            Show the progress bar.

    Returns:
        `dict`: as above, plus `protocol`, `stride` and `tokens` (the length of the token stream).

    Raises:
        `ValueError`: for an invalid option, not exactly one data argument, texts without a tokenizer, token ids
            outside the model's vocabulary, a context length the data is too short for (or that leaves no window),
            or one beyond the model's context with `beyond_context="error"`.
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

    plan = {length: evaluation_windows(stream.numel(), length, protocol, stride) for length in context_lengths}

    was_training = model.training
    model.eval()
    try:
        scorer, table = _WindowScorer(model), {}
        with _Progress(sum(len(windows) for windows in plan.values()), progress) as bar:
            for length, windows in plan.items():
                bar.at_length(length)
                table[length] = perplexity_at(scorer, stream, windows, protocol, batch_size, bar)
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
