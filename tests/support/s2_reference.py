"""An independent reference for S2-Attn: the partition written as an explicit [batch, heads, N, N] mask.

It follows the definition (paper Section 3.2, and the no-wrap partition of the reference code's
flash-attn varlen path) token by token, and shares no code with `longlora_hf.attention`.
"""

from __future__ import annotations

import math

import torch


def _documents(real_row, positions_row):
    """Per token: (document id, offset in its document), -1 for padding; and each document's length."""
    document, offset, lengths = [], [], []
    for i, is_real in enumerate(real_row):
        if not is_real:
            document.append(-1)
            offset.append(-1)
            continue
        new_document = (
            i == 0
            or not real_row[i - 1]
            or (positions_row is not None and positions_row[i] != positions_row[i - 1] + 1)
        )
        if new_document:
            lengths.append(0)
        document.append(len(lengths) - 1)
        offset.append(lengths[-1])
        lengths[-1] += 1
    return document, offset, lengths


def s2_reference_mask(
    real: torch.Tensor,
    heads: int,
    position_ids: torch.Tensor | None = None,
    group_size: int | None = None,
    group_size_ratio: float = 0.25,
    sliding_window: int | None = None,
    shift: bool = True,
) -> torch.Tensor:
    """mask[b, h, i, j] is True when query i of head h may attend to key j. shift=False: every head
    uses the unshifted groups (short attention, the paper's Table 1 ablation)."""
    batch, n = real.shape
    mask = torch.zeros(batch, heads, n, n, dtype=torch.bool)
    for b in range(batch):
        positions = None if position_ids is None else position_ids[min(b, position_ids.shape[0] - 1)].tolist()
        document, offset, lengths = _documents(real[b].tolist(), positions)
        for i in range(n):
            for j in range(i + 1):
                if document[i] < 0 or document[i] != document[j]:
                    continue
                if sliding_window is not None and i - j >= sliding_window:
                    continue
                length = lengths[document[i]]
                g = group_size if group_size is not None else int(length * group_size_ratio)
                if g < 2 or length <= g:  # fewer than two groups: dense
                    mask[b, :, i, j] = True
                    continue
                half_group = g // 2
                same_group = offset[i] // g == offset[j] // g
                shifted_group_i = 0 if offset[i] < half_group else 1 + (offset[i] - half_group) // g
                shifted_group_j = 0 if offset[j] < half_group else 1 + (offset[j] - half_group) // g
                mask[b, : heads // 2, i, j] = same_group
                mask[b, heads // 2 :, i, j] = (shifted_group_i == shifted_group_j) if shift else same_group
    return mask


def masked_attention(query, key, value, mask, scaling=None) -> torch.Tensor:
    """Plain softmax attention in float64 under an explicit boolean mask.

    query [B, H, N, D], key/value [B, Hkv, N, D], mask [B, H, N, N] -> [B, N, H, D]. Rows with no
    allowed key (padding queries) give zeros.
    """
    query, key, value = (x.double() for x in (query, key, value))
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, -math.inf)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (weights @ value).transpose(1, 2)


def group_boundaries(mask_half: torch.Tensor) -> list[int]:
    """Cumulative group lengths of one half, read off a reference mask [N, N] of one unpadded row:
    a new group starts at token i when it may not attend to token i - 1."""
    n = mask_half.shape[0]
    starts = [0] + [i for i in range(1, n) if not mask_half[i, i - 1]]
    return starts + [n]


def varlen_stand_in(calls):
    """A pure-torch stand-in for flash_attn_varlen_func: causal attention inside each cu_seqlens segment.
    It records each call's arguments in `calls` and applies no dropout (it records `dropout_p` instead)."""

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size
    ):
        calls.append(
            dict(
                cu_seqlens=cu_seqlens_q.tolist(),
                max_seqlen=max_seqlen_q,
                causal=causal,
                window=window_size,
                dropout_p=dropout_p,
            )
        )
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
        out = torch.zeros_like(q)
        repeat = q.shape[1] // k.shape[1]
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale  # flash-attn's default
        bounds = cu_seqlens_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
            ks, vs = ks.repeat_interleave(repeat, 0), vs.repeat_interleave(repeat, 0)
            scores = qs @ ks.transpose(-1, -2) * scale
            offsets = torch.arange(end - start)[:, None] - torch.arange(end - start)[None, :]
            allowed = offsets >= 0
            if window_size[0] >= 0:
                allowed &= offsets <= window_size[0]
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[start:end] = (torch.softmax(scores, -1) @ vs).transpose(0, 1)
        return out

    return flash_attn_varlen_func
