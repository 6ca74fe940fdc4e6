"""S2-Attn, shifted sparse attention (LongLoRA, paper Section 3.2), as a transformers attention backend.

In training, the tokens of every sequence are split into groups of G tokens. The first half of the
heads attends causally inside groups `[0, G), [G, 2G), ...`; the second half inside groups shifted by
half a group, `[0, G/2), [G/2, 3G/2), ..., [.., L)`. Shifted groups never wrap around: unlike the
reference implementation's eager path (which rolls the sequence, letting the first G/2 tokens see the
last G/2), no token ever attends to a later one. This is the partition of the reference flash-attn
varlen path, used here on every kernel.

    tokens   0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15        (L = 16, G = 4)
    half 0  [0 1 2 3][4 5 6 7][8 9 10 11][12 13 14 15]
    half 1  [0 1][2 3 4 5][6 7 8 9][10 11 12 13][14 15]

A batch is described by its "segments": runs of real (unpadded) tokens of one document. Padding comes
from the attention mask, document boundaries of packed rows from `position_ids` restarting. Each
segment is grouped on its own, so a padded or packed sequence gets exactly the attention it would get
alone. The groups of each half are written as cumulative lengths over the real tokens (`cu_seqlens`,
the flash-attn varlen layout); the SDPA path runs the same layout bucketed by group length.

Computing a layout is host-side work with a device-to-host copy, so it is done once per forward pass,
not once per layer: in training, the mask function registered for "s2" wraps the inner backend's mask
in an `S2ForwardMemo`, which transformers hands to every layer of one forward and which keeps the layouts
computed from it. They live as long as that forward.

Evaluation, generation (no gradients) and any call whose keys outnumber its queries (a KV cache) use
exact dense attention through the inner backend ("sdpa" by default). A training forward is one started
with gradients enabled: its `S2ForwardMemo` keeps S2 on in the layers that reentrant gradient checkpointing runs
without gradients, so their forward and their recomputation agree.

Under DeepSpeed's Ulysses sequence parallelism (`sequence_parallel.py`) a call holds the whole sequence
for a share of the heads, placed by their index in the whole model, and no mask: DeepSpeed drops it. There
a call trains whenever its module is in training mode, the layout is remembered by the values of the
position ids (`layout_without_mask`), and dense calls read packed documents and padding from position ids
that restart.
"""

from __future__ import annotations

import math
import threading
from dataclasses import astuple, dataclass, field, replace

import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .sequence_parallel import heads_held, model_heads, ulysses_group
from .settings import S2AttentionSettings


@dataclass
class S2Layout:
    """Where the groups of both halves of the heads lie in a batch.

    `token_index` lists the real tokens as indices into the flattened `[batch * seq]` positions
    (None when every position is real). For each half `h` of the heads:
    - `cu_seqlens[h]`: cumulative group lengths over the real tokens, int32, starting at 0 (the
      `cu_seqlens_q/k` of flash-attn's varlen API);
    - `max_seqlen[h]`: the longest group;
    - `runs[h]`: `(start, group length, number of groups)` for each maximal run of consecutive
      groups of equal length, in token order. A run is a view `[groups, length, heads, dim]` of the
      tokens, so the SDPA path batches groups without gathering them.
    """

    token_index: torch.Tensor | None
    cu_seqlens: tuple[torch.Tensor, torch.Tensor]
    max_seqlen: tuple[int, int]
    runs: tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]


def segment_lengths(real: torch.Tensor, position_ids: torch.Tensor | None) -> list[int]:
    """Lengths of the runs of real tokens of one document, in row-major order.

    real: [batch, seq] bool. position_ids: [batch or 1, seq] or None. A segment starts at a real token
    whose left neighbour is padding, the row start, or whose position id does not follow its
    neighbour's (packed documents restart at 0).
    """
    starts = real.clone()
    starts[:, 1:] &= ~real[:, :-1]
    if position_ids is not None:
        position_ids = position_ids.expand_as(real)
        restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
        starts[:, 1:] |= real[:, 1:] & restarts
    segment_of_token = torch.cumsum(starts.flatten(), 0)[real.flatten()]
    return torch.bincount(segment_of_token)[1:].tolist()


def group_lengths(length: int, group_size: int, shift: bool = True) -> tuple[list[int], list[int]]:
    """The group lengths of one segment, for the unshifted and the shifted half of the heads."""
    if group_size < 2 or length <= group_size:
        return [length], [length]
    unshifted = [group_size] * (length // group_size)
    if length % group_size:
        unshifted.append(length % group_size)
    if not shift:
        return unshifted, unshifted
    half_group = group_size // 2  # the shifted groups start half a group in
    shifted = [half_group] + [group_size] * ((length - half_group) // group_size)
    if (length - half_group) % group_size:
        shifted.append((length - half_group) % group_size)
    return unshifted, shifted


def _runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive groups of equal length: [(start token, group length, number of groups)]."""
    runs, start = [], 0
    for length in lengths:
        if runs and runs[-1][1] == length and runs[-1][0] + runs[-1][1] * runs[-1][2] == start:
            runs[-1] = (runs[-1][0], length, runs[-1][2] + 1)
        else:
            runs.append((start, length, 1))
        start += length
    return runs


# A sequence (or packed document) shorter than this gets dense attention when its groups would be under 2
# tokens, whatever the ratio: at the paper's smallest ratio (1/8) groups reach 2 tokens at 16 tokens, so a
# shorter one is no longer than an S2 group and dense attention over it is what S2 would approach. From this
# length on, groups under 2 tokens mean the ratio is too small for the data: an error, not dense training.
DENSE_BELOW_TOKENS = 16


def check_group_size(length: int, group_size: int, settings: S2AttentionSettings) -> None:
    """Refuse groups under 2 tokens for a training sequence of `length` >= DENSE_BELOW_TOKENS tokens.

    Args:
        length (`int`):
            The number of tokens of the sequence (or packed document).
        group_size (`int`):
            The group size it gets (`settings.group_size_for(length)`).
        settings (`S2AttentionSettings`):
            The settings that gave it, named in the message.

    Raises:
        `ValueError`: when the groups are under 2 tokens and the sequence is not short enough to run dense; the
            message gives the smallest ratio that works at this length.
    """
    if group_size < 2 and length >= DENSE_BELOW_TOKENS:
        smallest = math.ceil(2 / length * 1000) / 1000  # rounded up, so that it works at this length
        raise ValueError(
            f"S2-Attn: a training sequence of {length} tokens gets groups of int({length} x group_size_ratio "
            f"{settings.group_size_ratio}) = {group_size} token(s); groups need at least 2 tokens, or the sequence "
            f"would train with dense attention. Raise group_size_ratio to at least {smallest} (the paper's is 0.25), "
            "or set group_size."
        )


def s2_layout(
    real: torch.Tensor, position_ids: torch.Tensor | None, settings: S2AttentionSettings, device=None
) -> S2Layout:
    """Build the layout of both halves for a training batch. real: [batch, seq] bool, on any device; the
    layout's tensors go to `device` (default: real's). Groups under 2 tokens are refused
    (`check_group_size`), except in sequences shorter than DENSE_BELOW_TOKENS, which are dense.

    Args:
        real (`torch.Tensor`):
            `[batch, seq]` bool: which positions hold real (unpadded) tokens.
        position_ids (`torch.Tensor`, *optional*):
            `[batch or 1, seq]`; a position id that does not follow its left neighbour's starts a new document
            (packed rows). None: every run of real tokens is one document.
        settings (`S2AttentionSettings`):
            The group size and shift.
        device (`torch.device`, *optional*):
            Where the layout's tensors go; defaults to `real.device`.

    Returns:
        `S2Layout`: the groups of both halves of the heads over the real tokens.

    Raises:
        `ValueError`: from `check_group_size`, when a segment's groups would be under 2 tokens.
    """
    device = real.device if device is None else device
    real_cpu = real.cpu()
    positions_cpu = None if position_ids is None else position_ids.cpu()
    lengths = ([], [])
    for length in segment_lengths(real_cpu, positions_cpu):
        group_size = settings.group_size_for(length)
        check_group_size(length, group_size, settings)
        for half, groups in zip(lengths, group_lengths(length, group_size, settings.shift)):
            half.extend(groups)
    cu_seqlens = tuple(
        F.pad(torch.tensor(half, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)).to(device)
        for half in lengths
    )
    token_index = None if bool(real_cpu.all()) else real_cpu.flatten().nonzero().squeeze(1).to(device)
    runs = (_runs(lengths[0]), _runs(lengths[1]))
    return S2Layout(token_index, cu_seqlens, (max(lengths[0]), max(lengths[1])), runs)


def real_tokens_from_mask(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    """Which positions hold real tokens, from the mask the inner backend's mask function made.

    A 2D mask (flash-attn style) says it directly. In a 4D mask `[batch, 1, q, kv]` a token attends to
    itself unless it is padding, so the diagonal is the padding mask, for causal, sliding-window and
    packed masks alike; reading it costs O(seq), not O(seq^2).
    """
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool)
    if attention_mask.dim() == 2:
        return attention_mask[:, -seq:].bool().expand(batch, seq)
    diagonal = torch.diagonal(attention_mask[:, 0, :, -seq:], dim1=-2, dim2=-1)
    real = diagonal if diagonal.dtype == torch.bool else diagonal == 0
    return real.expand(batch, seq)


@dataclass(eq=False)
class S2ForwardMemo:
    """What the "s2" mask function hands the layers when gradients are enabled, in place of a mask: a memo of one
    forward pass holding the inner backend's mask and the layouts computed from it in that pass. (Named `S2Mask`
    in 0.1.0; that name stays an alias in 0.2.x.)

    transformers builds each kind of mask (causal, sliding-window) once per forward and hands the same
    object to every layer of that kind, so the first layer computes the layout and the others reuse it, as
    does the recomputation of a layer under gradient checkpointing (it gets the same arguments). Every
    layer of a forward gets the same `position_ids` tensor, so the memo recognises it by identity, and
    holds it: the memo and what it holds live as long as the forward.
    """

    inner: torch.Tensor | None
    """The inner backend's mask: 4D for SDPA, 2D for flash-attn; None where it needs none (no padding)."""
    layouts: list[tuple[torch.Tensor | None, tuple, S2Layout]] = field(default_factory=list)
    """(position_ids, (batch, seq, device, settings), layout) of each layout computed from this mask."""

    def _used_as_a_tensor(self, *args, **kwargs):
        raise TypeError(
            "This model uses the attention mask as a tensor inside its layers (a sparse-attention indexer, as in "
            "DeepSeek-V3.2, does), where attn_implementation='s2' hands its layers an S2ForwardMemo. S2-Attn cannot "
            f"train such a model: {WITHOUT_S2}."
        )

    __getitem__ = __and__ = __or__ = __add__ = __mul__ = __invert__ = _used_as_a_tensor

    @property
    def dtype(self):  # read before any arithmetic by models that build their own masks (Doge's dynamic mask)
        self._used_as_a_tensor()

    shape = device = dtype

    def layout(
        self,
        position_ids: torch.Tensor | None,
        batch: int,
        seq: int,
        settings: S2AttentionSettings,
        device: torch.device,
    ) -> S2Layout:
        """The layout for a call with these position ids and sizes, computed on its first call.

        Args:
            position_ids (`torch.Tensor`, *optional*):
                The call's position ids, recognised by identity (every layer of a forward gets the same tensor).
            batch (`int`):
                The batch size of the call.
            seq (`int`):
                Its sequence length.
            settings (`S2AttentionSettings`):
                The model's S2 settings.
            device (`torch.device`):
                Where the layout's tensors go.

        Returns:
            `S2Layout`: the layout of `s2_layout`, for the real tokens this mask marks.
        """
        key = (batch, seq, device, astuple(settings))
        for known_position_ids, known_key, layout in self.layouts:
            if known_position_ids is position_ids and known_key == key:
                return layout
        layout = s2_layout(real_tokens_from_mask(self.inner, batch, seq), position_ids, settings, device)
        self.layouts.append((position_ids, key, layout))
        return layout


# The layouts of the last calls without a mask: [(position ids (a copy), key, layout)]. Shared by threads (the
# recomputation of checkpointed layers can run on autograd's device thread): an entry is used for equal values only.
_without_mask: list[tuple[torch.Tensor | None, tuple, S2Layout]] = []
_without_mask_lock = threading.Lock()
_REMEMBERED = 2  # the training layout and the documents of a dense call can alternate


def layout_without_mask(
    position_ids: torch.Tensor | None, batch: int, seq: int, settings: S2AttentionSettings, device
) -> S2Layout:
    """The layout of a call that has no mask: every token is real, documents restart their position ids.

    This is the case under sequence parallelism, where DeepSpeed drops the mask and hands every layer a newly
    gathered `position_ids` tensor: no object ties the layers of one forward together, so the layout is
    remembered by the *values* of the position ids (kept as a copy), the sizes, device and settings, for the last
    two calls. The first layer of a forward computes it; the others compare the position ids (O(seq), on their
    device) and reuse it. A buffer refilled in place between calls no longer compares equal.
    """
    key = (batch, seq, device, astuple(settings))
    with _without_mask_lock:
        for known_ids, known_key, layout in _without_mask:
            if known_key == key and _same_values(known_ids, position_ids):
                return layout
    layout = s2_layout(torch.ones(batch, seq, dtype=torch.bool), position_ids, settings, device)
    with _without_mask_lock:
        _without_mask.insert(0, (None if position_ids is None else position_ids.detach().clone(), key, layout))
        del _without_mask[_REMEMBERED:]
    return layout


def _same_values(known: torch.Tensor | None, given: torch.Tensor | None) -> bool:
    if known is None or given is None:
        return known is given
    return known.shape == given.shape and known.device == given.device and torch.equal(known, given)


def kv_head_parts(key: torch.Tensor, heads: int, split: int) -> list[torch.Tensor]:
    """The key (or value) heads read by query heads `[0, split)` and by `[split, heads)`: [tokens, kv_heads, dim]
    -> two tensors.

    Under grouped-query attention query head h reads kv head h // (heads / kv_heads). When `split` falls between
    the query heads of two kv heads each part reads its own kv heads (a split: no copy, and a backward that
    concatenates); with one kv head (MQA) both parts read it. Only a kv head serving query heads on both sides
    of `split` (an odd number of kv heads at the middle, or a boundary inside a sequence-parallel rank) needs an
    index that repeats it.
    """
    kv_heads = key.shape[1]
    if kv_heads == 1:
        return [key, key]
    group = heads // kv_heads
    if split % group == 0:
        return list(key.split([split // group, kv_heads - split // group], dim=1))
    index = torch.arange(heads, device=key.device) // group
    return [key.index_select(1, index[:split]), key.index_select(1, index[split:])]


def _sliding_window_mask(length: int, window: int, device) -> torch.Tensor:
    # transformers' sliding window: query i sees keys j with i - window < j <= i.
    offsets = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (offsets >= 0) & (offsets < window)


def _causal_mask(length: int, device) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def sdpa_with_sinks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    sinks: torch.Tensor,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """SDPA whose softmax includes one sink logit per head, as gpt-oss's eager attention computes it: the sink
    joins the normalisation and contributes no value (the weights of the real keys sum to less than 1).

    query [batch, heads, q, dim], key/value [batch, kv_heads, kv, dim], allowed: bool, broadcastable to
    [batch, heads, q, kv]; sinks [heads] -> [batch, heads, q, value_dim]. SDPA has no sink argument: a zero key
    and value are appended, whose score is set to the sink logit by the additive mask (zero key: score 0, plus
    the bias), so its weight is exp(sink) / Z and it adds nothing to the output."""
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    bias = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~allowed, float("-inf"))
    bias = bias.expand(batch, heads, q_len, kv_len)
    sink = sinks.to(query.dtype).view(1, heads, 1, 1).expand(batch, heads, q_len, 1)
    key, value = F.pad(key, (0, 0, 0, 1)), F.pad(value, (0, 0, 0, 1))  # [.., kv + 1, ..]: the sink's zero token
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=torch.cat([bias, sink], dim=-1),
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )


def sdpa_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    runs: list[tuple[int, int, int]],
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention inside each group, with SDPA: one batched call per distinct group length.
    `sinks`: one attention-sink logit per head ([heads], gpt-oss's `s_aux`), which joins each group's softmax
    (`sdpa_with_sinks`).

    query: [tokens, heads, dim], key: [tokens, kv_heads, dim], value: [tokens, kv_heads, value_dim] ->
    [tokens, heads, value_dim] (SDPA takes a value head size of its own). Each run of
    equal groups is a view; runs of the same length (other rows, other documents) are concatenated
    into one call.
    """
    enable_gqa = query.shape[1] != key.shape[1]
    # The runs tile the tokens in order. `split`, unlike slicing, has a backward that concatenates
    # instead of filling a zero tensor of the whole input per piece.
    sizes = [length * count for _, length, count in runs]
    pieces = [x.split(sizes) for x in (query, key, value)]
    by_length: dict[int, list[int]] = {}
    for index, (_, length, _) in enumerate(runs):
        by_length.setdefault(length, []).append(index)
    run_outputs: list[torch.Tensor | None] = [None] * len(runs)
    for length, members in by_length.items():
        # [groups * length, heads, dim] -> [groups, heads, length, dim]
        q, k, v = (
            (x[members[0]] if len(members) == 1 else torch.cat([x[i] for i in members]))
            .unflatten(0, (-1, length))
            .transpose(1, 2)
            for x in pieces
        )
        if sinks is not None:
            window = None if sliding_window is None or sliding_window >= length else sliding_window
            allowed = (
                _sliding_window_mask(length, window, query.device) if window else _causal_mask(length, query.device)
            )
            out = sdpa_with_sinks(q, k, v, allowed, sinks, dropout, scaling)
        else:
            mask = None
            if sliding_window is not None and sliding_window < length:
                mask = _sliding_window_mask(length, sliding_window, query.device)
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None,
                scale=scaling,
                enable_gqa=enable_gqa,
            )
        out = out.transpose(1, 2).flatten(0, 1)  # [groups * length, heads, value_dim]
        for i, piece in zip(members, out.split([runs[i][2] * length for i in members])):
            run_outputs[i] = piece
    return torch.cat(run_outputs) if len(run_outputs) > 1 else run_outputs[0]


def _load_flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        raise ImportError(
            "s2 with inner_attn_implementation='flash_attention_2' needs flash-attn: "
            "`pip install 'longlora-hf[flash]'` on a CUDA machine, or use inner_attn_implementation='sdpa'."
        ) from error
    return flash_attn_varlen_func


def flash_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal attention inside each group of `cu_seqlens`, with flash-attn's varlen kernel (GPU).

    flash-attn 2 wants one head size for query, key and value. A value head size of its own (MLA) is
    zero-padded up to the query's and the output cropped back, as transformers' flash path does; the
    padded columns of the value only produce the cropped columns. A value wider than the query pads
    query and key instead, which leaves the scores unchanged once the scale is fixed to the query's.
    """
    flash_attn_varlen_func = _load_flash_varlen()
    # Same convention as transformers' flash path: a window of `sliding_window` tokens including itself.
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1)
    dim, value_dim = query.shape[-1], value.shape[-1]
    if value_dim < dim:
        value = F.pad(value, (0, dim - value_dim))
    elif value_dim > dim:
        scaling = dim**-0.5 if scaling is None else scaling
        query, key = F.pad(query, (0, value_dim - dim)), F.pad(key, (0, value_dim - dim))
    out = flash_attn_varlen_func(
        query,
        key,
        value,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
        window_size=window,
    )
    return out[..., :value_dim] if value_dim != out.shape[-1] else out


# The way out of every refusal of S2-Attn, for each route into it: it trains LongLoRA with dense attention.
WITHOUT_S2 = (
    "train it without S2-Attn: LongLoraConfig(use_s2_attn=False), `longlora-hf sft --use_s2_attn false`, or "
    "attn_implementation='sdpa' for a model you switched to 's2' yourself"
)


def check_causal(is_causal: bool, owner: str) -> None:
    """Refuse non-causal attention: S2-Attn's groups restrict a causal mask. `owner` names the model or layer.

    Args:
        is_causal (`bool`):
            Whether the attention is causal.
        owner (`str`):
            The model or layer, named in the message.

    Raises:
        `ValueError`: when `is_causal` is False.
    """
    if not is_causal:
        raise ValueError(
            f"S2-Attn is for causal language models (each token attends only to earlier tokens), but {owner} is "
            f"non-causal (is_causal=False: an encoder): {WITHOUT_S2}."
        )


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, dim] -> [batch * seq, heads, dim]: the token-major layout of the grouped kernels."""
    return x.transpose(1, 2).reshape(x.shape[0] * x.shape[2], x.shape[1], x.shape[3])


def _attend_in_groups(
    q, k, v, layout: S2Layout, half: int, settings, dropout, scaling, sliding_window, sinks=None
) -> torch.Tensor:
    """Causal attention inside the groups of `half` of `layout`, with the inner kernel: [tokens, heads, dim].

    Attention sinks run on the SDPA path whatever the inner kernel: flash-attn's varlen API has no sink argument,
    and rescaling its output by its log-sum-exp would get no gradient through the sinks (flash-attn returns the
    log-sum-exp without one)."""
    if settings.inner_attn_implementation == "flash_attention_2" and sinks is None:
        return flash_varlen(
            q, k, v, layout.cu_seqlens[half], layout.max_seqlen[half], dropout, scaling, sliding_window
        )
    return sdpa_varlen(q, k, v, layout.runs[half], dropout, scaling, sliding_window, sinks)


# Arguments the attention modules of transformers pass that leave the attention S2 computes unchanged (bookkeeping,
# or packed-document boundaries S2 reads from the position ids), besides those S2 takes by name.
PASSIVE_ATTENTION_KWARGS = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "past_key_values",
        "past_key_value",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "layer_idx",
        "position_embeddings",
        "target_dtype",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "seq_idx",
        # The loss's bookkeeping, which model forwards pass on with the rest of their keyword arguments: the Trainer's
        # token count, and the labels DeepSpeed's sequence parallelism shifts before it splits the sequence.
        "num_items_in_batch",
        "shift_labels",
    }
)


def check_attention_kwargs(kwargs: dict, owner: str) -> None:
    """Refuse an attention argument S2 does not implement, unless it is unset: S2 computes the attention itself
    in training, so an argument that changes the result (soft-capping, a bias, a head mask...) would be ignored.

    Args:
        kwargs (`dict`):
            The keyword arguments an attention module passed, less those S2 takes by name.
        owner (`str`):
            The attention module, named in the message.

    Raises:
        `ValueError`: when an argument outside `PASSIVE_ATTENTION_KWARGS` is set (neither None nor False).
    """
    unknown = {
        name: value
        for name, value in kwargs.items()
        if name not in PASSIVE_ATTENTION_KWARGS and value is not None and value is not False
    }
    if unknown:
        name, value = next(iter(unknown.items()))
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise ValueError(
            f"S2-Attn does not implement the attention argument {name}={shown} that {owner} passes "
            f"(all it does not implement: {sorted(unknown)}); training with S2 would ignore it: {WITHOUT_S2}."
        )


def _layer_type(module) -> str | None:
    """The layer type of an attention module (`config.layer_types[layer_idx]`), where the model declares one."""
    layer_types, index = getattr(module.config, "layer_types", None), getattr(module, "layer_idx", None)
    if layer_types is None or not isinstance(index, int) or not 0 <= index < len(layer_types):
        return None
    return layer_types[index]


# Layer types whose own mask limits attention to blocks S2 does not build (Llama 4's chunks of
# `attention_chunk_size` tokens): they train with their own attention, unchanged.
OWN_ATTENTION_LAYER_TYPES = frozenset({"chunked_attention"})


def _dense(
    module,
    query,
    key,
    value,
    attention_mask,
    settings,
    dropout,
    scaling,
    is_causal,
    sliding_window,
    position_ids,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Exact dense causal attention through the inner backend.

    Under sequence parallelism DeepSpeed's wrapper drops the mask in evaluation too (accelerate runs each rank's
    own whole rows there): a call with no mask whose position ids restart inside a row (packed documents, and
    pads given restarting ids, as TRL's collator makes them) then gets attention within each document, as the
    mask would have given. Outside sequence parallelism the call is the inner backend's, unchanged."""
    mask = attention_mask.inner if isinstance(attention_mask, S2ForwardMemo) else attention_mask
    batch, heads, seq, _ = query.shape
    if (
        mask is None
        and ulysses_group() is not None  # DeepSpeed's wrapper dropped the mask
        and is_causal is not False
        and getattr(module, "is_causal", True)
        and seq == key.shape[2]
        and position_ids is not None
        and position_ids.dim() == 2
        and position_ids.shape[-1] == seq
        and bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())  # a row holds more than one document
    ):
        documents = replace(settings, group_size_ratio=1.0, group_size=None, shift=False)  # one group per document
        layout = layout_without_mask(position_ids, batch, seq, documents, query.device)
        q, k, v = (_tokens(x) for x in (query, key, value))
        sinks = kwargs.get("s_aux")
        if sinks is not None:
            first_head, _ = heads_held(module.config, heads)
            sinks = sinks[first_head : first_head + heads]
        out = _attend_in_groups(q, k, v, layout, 0, settings, dropout, scaling, sliding_window, sinks)
        return out.view(batch, seq, heads, value.shape[-1]), None
    sinks = kwargs.get("s_aux")
    if sinks is not None and settings.inner_attn_implementation in ("sdpa", "flash_attention_2"):
        # transformers' SDPA function ignores sinks (gpt-oss declares no SDPA support), and its flash-attn function
        # drops them (flash-attn's API has none): computed here, with SDPA. A flash mask is 2D padding only, so the
        # sliding window is applied here; SDPA's 4D mask already holds it.
        first_head, _ = heads_held(module.config, heads)
        window = sliding_window if settings.inner_attn_implementation == "flash_attention_2" else None
        allowed = _dense_allowed(mask, seq, key.shape[2], query.device, window)
        out = sdpa_with_sinks(query, key, value, allowed, sinks[first_head : first_head + heads], dropout, scaling)
        return out.transpose(1, 2).contiguous(), None
    if is_causal is not None:
        kwargs["is_causal"] = is_causal
    return ALL_ATTENTION_FUNCTIONS[settings.inner_attn_implementation](
        module,
        query,
        key,
        value,
        mask,
        dropout=dropout,
        scaling=scaling,
        sliding_window=sliding_window,
        position_ids=position_ids,
        **kwargs,
    )


def _dense_allowed(
    mask: torch.Tensor | None, q_len: int, kv_len: int, device, sliding_window: int | None = None
) -> torch.Tensor:
    """The keys each query may see, [batch or 1, 1, q, kv] bool: from an SDPA mask (4D, bool or additive) as it
    is; else the causal rule with the queries last, within `sliding_window`, and without the padded keys of a
    flash-attn mask (2D [batch, kv], 1 for a real token) where there is one."""
    if mask is not None and mask.dim() == 4:
        mask = mask[..., -kv_len:]
        return mask if mask.dtype == torch.bool else mask == 0
    key_position = torch.arange(kv_len, device=device)[None, :]  # [1, kv]
    query_position = torch.arange(q_len, device=device)[:, None] + kv_len - q_len  # [q, 1]
    allowed = key_position <= query_position  # [q, kv]
    if sliding_window is not None:
        allowed = allowed & (key_position > query_position - sliding_window)  # transformers' sliding_window_overlay
    if mask is None:
        return allowed
    return allowed[None, None] & mask[:, None, None, -kv_len:].bool()


def s2_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: S2ForwardMemo | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Shifted sparse attention in training, dense attention otherwise.

    query/key: [batch, heads or kv_heads, seq, dim]; value: [batch, kv_heads, seq, value_dim] (GQA/MQA:
    fewer kv heads; MLA, e.g. DeepSeek-V3: value_dim != dim). attention_mask: what `s2_mask` made (an
    `S2ForwardMemo` in training, the inner backend's mask otherwise), or a mask transformers passes through
    unchanged (a 4D mask the caller built) or None. Returns ([batch, seq, heads, value_dim], None), the
    contract of transformers' attention functions.

    transformers calls it for `attn_implementation="s2"`; a call trains with S2 when its module is in training
    mode, gradients are on (or its mask is an `S2ForwardMemo`, or the call runs under sequence parallelism), and
    queries and keys have the same length; every other call, and every call of a chunked-attention layer (Llama 4),
    is dense, through the inner backend.

    Args:
        module (`torch.nn.Module`):
            The attention module; its `config` holds the S2 settings (`config.s2_attention`).
        query (`torch.Tensor`):
            `[batch, heads, seq, dim]`.
        key (`torch.Tensor`):
            `[batch, kv_heads, kv_seq, dim]`.
        value (`torch.Tensor`):
            `[batch, kv_heads, kv_seq, value_dim]`.
        attention_mask (`S2ForwardMemo` or `torch.Tensor`, *optional*):
            As above.
        dropout (`float`, defaults to 0.0):
            Attention dropout probability.
        scaling (`float`, *optional*):
            Softmax scale; None: `dim ** -0.5`, the kernels' default.
        is_causal (`bool`, *optional*):
            Passed by some modules; a training call with `is_causal=False` is refused.
        sliding_window (`int`, *optional*):
            The layer's sliding window, applied within the groups.
        position_ids (`torch.Tensor`, *optional*):
            Where packed documents restart; each is grouped on its own.
        **kwargs:
            The module's other attention arguments: `s_aux` (attention sinks) is applied; in training, one that
            would change the result and that S2 does not implement is refused (`check_attention_kwargs`).

    Returns:
        `tuple[torch.Tensor, None]`: the attention output `[batch, seq, heads, value_dim]`, and no weights.

    Raises:
        `ValueError`: in a training call, for non-causal attention, an attention argument S2 does not implement,
            or groups under 2 tokens (`check_group_size`).
    """
    settings = S2AttentionSettings.from_config(module.config)
    q_len, kv_len = query.shape[2], key.shape[2]
    # Under Ulysses sequence parallelism this call holds the whole sequence for a share of the heads, and no mask
    # (DeepSpeed drops it): whether it trains is the module's mode, since no S2ForwardMemo can mark a training forward.
    sequence_parallel = query.shape[1] != model_heads(module.config, query.shape[1])
    # Otherwise `s2_mask` makes an S2ForwardMemo only for a forward started with gradients, so the mask still says
    # "training" inside a layer that reentrant gradient checkpointing runs without them (its recomputation has them).
    training = module.training and (
        sequence_parallel or isinstance(attention_mask, S2ForwardMemo) or torch.is_grad_enabled()
    )
    dense = not training or q_len != kv_len
    if not dense:  # a training call: S2 applies, unless the layer keeps its own local pattern (chunked attention)
        check_causal(is_causal is not False and getattr(module, "is_causal", True), type(module).__name__)
        dense = _layer_type(module) in OWN_ATTENTION_LAYER_TYPES
    if dense:
        return _dense(
            module,
            query,
            key,
            value,
            attention_mask,
            settings,
            dropout,
            scaling,
            is_causal,
            sliding_window,
            position_ids,
            **kwargs,
        )
    first_head, all_heads = heads_held(module.config, query.shape[1])
    sinks = kwargs.pop("s_aux", None)
    check_attention_kwargs(kwargs, type(module).__name__)

    batch, heads, seq, _ = query.shape
    value_dim = value.shape[-1]  # differs from the query/key head size under MLA (DeepSeek-V2/V3)
    if isinstance(attention_mask, S2ForwardMemo):
        layout = attention_mask.layout(position_ids, batch, seq, settings, query.device)
    elif attention_mask is None:
        layout = layout_without_mask(position_ids, batch, seq, settings, query.device)
    else:
        # A 4D mask the caller built (transformers passes it through): nothing ties this call to the other layers
        # of its forward, so it gets a layout of its own.
        layout = S2ForwardMemo(attention_mask).layout(position_ids, batch, seq, settings, query.device)
    # [batch, heads, seq, dim] -> [batch * seq, heads, dim], then keep the real tokens only.
    q, k, v = (_tokens(x) for x in (query, key, value))
    if layout.token_index is not None:
        q, k, v = (x.index_select(0, layout.token_index) for x in (q, k, v))

    # The heads of this call with a global index below all_heads // 2 attend in the unshifted groups (half 0), the
    # others in the shifted ones (half 1), as the reference code shifts heads [H // 2, H): with 9 heads, 4 and 5.
    unshifted = min(max(all_heads // 2 - first_head, 0), heads)
    sink_parts = (None, None)
    if sinks is not None:  # one logit per head of the whole model: this call's share, split like the heads
        sink_parts = sinks[first_head : first_head + heads].split([unshifted, heads - unshifted])
    parts = zip(
        (0, 1),
        q.split([unshifted, heads - unshifted], dim=1),
        kv_head_parts(k, heads, unshifted),
        kv_head_parts(v, heads, unshifted),
        sink_parts,
    )
    outputs = []
    for half, q_part, k_part, v_part, sink_part in parts:
        if q_part.shape[1]:
            outputs.append(
                _attend_in_groups(
                    q_part, k_part, v_part, layout, half, settings, dropout, scaling, sliding_window, sink_part
                )
            )
    out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]  # [tokens, heads, value_dim]

    if layout.token_index is not None:
        out = out.new_zeros(batch * seq, heads, value_dim).index_copy(0, layout.token_index, out)
    return out.view(batch, seq, heads, value_dim), None


def s2_mask(*args, config=None, **kwargs) -> S2ForwardMemo | torch.Tensor | None:
    """The mask function registered for "s2": the inner backend's own (a 4D mask for SDPA, 2D for flash).

    transformers calls it once per forward pass and mask kind. With gradients enabled (training) the mask
    comes wrapped in an `S2ForwardMemo`, which marks a training forward and carries the layout from the first
    layer to the others. Without them (evaluation, generation) attention is dense, and the inner backend's
    mask is returned as it is, so generation's own mask handling is untouched. Training reads only O(seq)
    of the mask (padding from its diagonal); the dense path hands it to the inner backend unchanged.

    Args:
        *args, **kwargs:
            What transformers passes a mask function; handed on to the inner backend's.
        config (`transformers.PreTrainedConfig`, *optional*):
            The model config, whose S2 settings name the inner backend.

    Returns:
        `S2ForwardMemo`, `torch.Tensor` or `None`: the inner backend's mask, wrapped in an `S2ForwardMemo` when
        gradients are enabled.
    """
    inner_attn_implementation = S2AttentionSettings.from_config(config).inner_attn_implementation
    mask = ALL_MASK_ATTENTION_FUNCTIONS[inner_attn_implementation](*args, config=config, **kwargs)
    return S2ForwardMemo(mask) if torch.is_grad_enabled() else mask


S2Mask = S2ForwardMemo  # the 0.1.0 name, kept for 0.2.x
