"""The S2-Attn attention function, against an explicit float64 mask of the partition
(tests/support/s2_reference.py)."""

from __future__ import annotations

import math
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from longlora_hf.attention import S2AttentionSettings, s2, sequence_parallel
from longlora_hf.attention.s2 import s2_attention_forward, s2_layout
from support.s2_reference import group_boundaries, masked_attention, s2_reference_mask, varlen_stand_in


TOLERANCE = 1e-10


def attention_module(training=True, **settings):
    config = SimpleNamespace(s2_attention=asdict(S2AttentionSettings(**settings)))
    return SimpleNamespace(config=config, training=training, is_causal=True)


def qkv(batch, heads, kv_heads, n, dim=8, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n, dim), (batch, kv_heads, n, dim), (batch, kv_heads, n, dim)]
    return [torch.randn(*s, dtype=torch.float64, generator=generator, requires_grad=requires_grad) for s in shapes]


def padding_mask_4d(real: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean mask transformers' sdpa mask function makes: causal, no padded keys, no cross-document keys."""
    n = real.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = causal[None] & real[:, None, :]
    if position_ids is not None:
        document = torch.cumsum(
            torch.cat([torch.ones_like(position_ids[:, :1]), (position_ids[:, 1:] == 0).long()], 1), 1
        )
        mask &= document[:, :, None] == document[:, None, :]
    return mask[:, None]


@pytest.mark.parametrize("n", [7, 16, 19, 23, 64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2), (6, 3), (4, 1), (8, 1)])
@pytest.mark.parametrize(
    "groups",
    [dict(group_size_ratio=0.25), dict(group_size=6), dict(group_size=5), dict(group_size_ratio=0.25, shift=False)],
)
def test_training_matches_the_dense_reference_mask(n, heads, kv_heads, groups):
    """MHA, GQA (also with a kv head straddling the two halves: 6/3) and MQA; N not divisible by G; batch 2."""
    query, key, value = qkv(2, heads, kv_heads, n)
    out, weights = s2_attention_forward(attention_module(**groups), query, key, value, None)
    mask = s2_reference_mask(torch.ones(2, n, dtype=torch.bool), heads, **groups)
    assert weights is None
    assert out.shape == (2, n, heads, 8)
    torch.testing.assert_close(out, masked_attention(query, key, value, mask), atol=TOLERANCE, rtol=0)


def test_no_token_attends_to_a_later_token_even_across_the_shift():
    """The reference code's eager path rolls the sequence so the first G/2 tokens see the last G/2; ours never does."""
    n, heads = 16, 4
    query, key, value = qkv(1, heads, heads, n, requires_grad=True)
    out, _ = s2_attention_forward(attention_module(), query, key, value, None)
    for i in range(n - 1):
        grads = torch.autograd.grad(out[:, : i + 1].sum(), (query, key, value), retain_graph=True)
        for grad in grads:
            assert torch.count_nonzero(grad[:, :, i + 1 :]) == 0, f"position {i} depends on a later token"


def test_sequences_shorter_than_two_groups_use_dense_causal_attention():
    query, key, value = qkv(1, 4, 2, 8)
    out, _ = s2_attention_forward(attention_module(group_size=8), query, key, value, None)
    causal = torch.ones(8, 8, dtype=torch.bool).tril().expand(1, 4, 8, 8)
    torch.testing.assert_close(out, masked_attention(query, key, value, causal), atol=TOLERANCE, rtol=0)


def test_right_padding_gives_each_real_token_its_unpadded_output():
    lengths, n, heads = [19, 12], 19, 4
    query, key, value = qkv(2, heads, 2, n)
    real = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    out, _ = s2_attention_forward(attention_module(), query, key, value, padding_mask_4d(real))
    reference = masked_attention(query, key, value, s2_reference_mask(real, heads))
    torch.testing.assert_close(out[real], reference[real], atol=TOLERANCE, rtol=0)
    for row, length in enumerate(lengths):
        alone, _ = s2_attention_forward(
            attention_module(), *(x[row : row + 1, :, :length] for x in (query, key, value)), None
        )
        torch.testing.assert_close(out[row, :length], alone[0], atol=TOLERANCE, rtol=0)


def test_left_padding_groups_from_the_first_real_token():
    n, heads = 18, 4
    query, key, value = qkv(2, heads, 4, n)
    real = torch.arange(n)[None, :] >= torch.tensor([0, 5])[:, None]
    out, _ = s2_attention_forward(attention_module(), query, key, value, padding_mask_4d(real))
    reference = masked_attention(query, key, value, s2_reference_mask(real, heads))
    torch.testing.assert_close(out[real], reference[real], atol=TOLERANCE, rtol=0)


def test_a_2d_padding_mask_as_flash_attention_masks_give_the_same_result():
    n, heads = 17, 4
    query, key, value = qkv(2, heads, 2, n)
    real = torch.arange(n)[None, :] < torch.tensor([17, 9])[:, None]
    out_2d, _ = s2_attention_forward(attention_module(), query, key, value, real)
    reference = masked_attention(query, key, value, s2_reference_mask(real, heads))
    torch.testing.assert_close(out_2d[real], reference[real], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("document_lengths", [[9, 13, 2], [24], [5, 5, 5, 9]])
def test_packed_documents_are_grouped_per_document_and_never_attend_across(document_lengths):
    heads = 4
    position_ids = torch.cat([torch.arange(length) for length in document_lengths])[None]
    n = position_ids.shape[1]
    query, key, value = qkv(1, heads, 2, n)
    out, _ = s2_attention_forward(attention_module(), query, key, value, None, position_ids=position_ids)
    mask = s2_reference_mask(torch.ones(1, n, dtype=torch.bool), heads, position_ids=position_ids)
    torch.testing.assert_close(out, masked_attention(query, key, value, mask), atol=TOLERANCE, rtol=0)
    # each document on its own gives the same outputs
    start = 0
    for length in document_lengths:
        alone, _ = s2_attention_forward(
            attention_module(), *(x[:, :, start : start + length] for x in (query, key, value)), None
        )
        torch.testing.assert_close(out[:, start : start + length], alone, atol=TOLERANCE, rtol=0)
        start += length


def test_packed_rows_with_padding_and_a_4d_mask():
    heads, n = 4, 20
    position_ids = torch.tensor([list(range(11)) + list(range(9)), list(range(14)) + [0] * 6])
    real = torch.tensor([[True] * 20, [True] * 14 + [False] * 6])
    query, key, value = qkv(2, heads, 4, n)
    mask = padding_mask_4d(real, position_ids)
    out, _ = s2_attention_forward(attention_module(), query, key, value, mask, position_ids=position_ids)
    reference = masked_attention(query, key, value, s2_reference_mask(real, heads, position_ids=position_ids))
    torch.testing.assert_close(out[real], reference[real], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("window", [3, 6])
def test_sliding_window_applies_inside_groups(window):
    heads, n = 4, 32
    query, key, value = qkv(2, heads, 2, n)
    out, _ = s2_attention_forward(attention_module(), query, key, value, None, sliding_window=window)
    mask = s2_reference_mask(torch.ones(2, n, dtype=torch.bool), heads, sliding_window=window)
    torch.testing.assert_close(out, masked_attention(query, key, value, mask), atol=TOLERANCE, rtol=0)


def test_flash_varlen_layout_matches_the_reference_partition(monkeypatch):
    """The flash path cannot run on the CPU; its cumulative lengths and outputs are checked with a stand-in."""
    calls = []
    monkeypatch.setattr(s2, "_load_flash_varlen", lambda: varlen_stand_in(calls))
    heads, n = 4, 22
    query, key, value = qkv(2, heads, 2, n)
    real = torch.arange(n)[None, :] < torch.tensor([22, 15])[:, None]
    module = attention_module(inner_attn_implementation="flash_attention_2")
    out, _ = s2_attention_forward(module, query, key, value, real, scaling=8**-0.5)
    reference = masked_attention(query, key, value, s2_reference_mask(real, heads))
    torch.testing.assert_close(out[real], reference[real], atol=TOLERANCE, rtol=0)

    # cu_seqlens of each half: row 0's groups, then row 1's, over the 37 real tokens, read off the reference mask
    expected = []
    for half_head in (0, heads // 2):
        bounds, offset = [0], 0
        for length in (22, 15):
            row_mask = s2_reference_mask(torch.ones(1, length, dtype=torch.bool), heads)[0, half_head]
            bounds += [offset + b for b in group_boundaries(row_mask)[1:]]
            offset += length
        expected.append(bounds)
    assert [call["cu_seqlens"] for call in calls] == expected
    assert all(call["causal"] and call["window"] == (-1, -1) for call in calls)
    assert [call["max_seqlen"] for call in calls] == [max(b - a for a, b in zip(e[:-1], e[1:])) for e in expected]


def test_flash_inner_backend_without_flash_attn_installed_says_how_to_fix_it():
    query, key, value = qkv(1, 4, 4, 16)
    module = attention_module(inner_attn_implementation="flash_attention_2")
    with pytest.raises(ImportError, match=r"longlora-hf\[flash\]"):
        s2_attention_forward(module, query, key, value, None)


def test_layout_describes_runs_of_equal_groups_in_token_order():
    layout = s2_layout(torch.ones(2, 16, dtype=torch.bool), None, S2AttentionSettings())
    assert layout.token_index is None
    assert layout.cu_seqlens[0].tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    assert layout.cu_seqlens[1].tolist() == [0, 2, 6, 10, 14, 16, 18, 22, 26, 30, 32]
    assert layout.runs[0] == [(0, 4, 8)]
    assert layout.runs[1] == [(0, 2, 1), (2, 4, 3), (14, 2, 2), (18, 4, 3), (30, 2, 1)]
    assert layout.max_seqlen == (4, 4)


def test_dropout_drops_attention_weights_of_both_halves():
    """With one-hot values the output is the attention weights themselves: under dropout p each weight of
    the reference partition is either dropped (0) or kept and scaled by 1 / (1 - p), in both halves."""
    heads, n, p = 4, 16, 0.5
    query, key, _ = qkv(1, heads, 2, n)
    one_hot = torch.eye(n, dtype=torch.float64).expand(1, 2, n, n)  # value of key j = e_j
    torch.manual_seed(0)
    out, _ = s2_attention_forward(attention_module(), query, key, one_hot, None, dropout=p)
    weights = masked_attention(query, key, one_hot, s2_reference_mask(torch.ones(1, n, dtype=torch.bool), heads))
    kept = out != 0
    torch.testing.assert_close(out[kept], weights[kept] / (1 - p), atol=TOLERANCE, rtol=0)
    allowed = weights > 0
    for half in (slice(0, heads // 2), slice(heads // 2, heads)):
        assert (allowed & ~kept)[:, :, half].any(), "no weight of this half was dropped"
        assert (allowed & kept)[:, :, half].any(), "every weight of this half was dropped"


def test_the_flash_path_hands_the_dropout_to_the_kernel_of_each_half(monkeypatch):
    calls = []
    monkeypatch.setattr(s2, "_load_flash_varlen", lambda: varlen_stand_in(calls))
    query, key, value = qkv(1, 4, 2, 16)
    module = attention_module(inner_attn_implementation="flash_attention_2")
    s2_attention_forward(module, query, key, value, None, dropout=0.3)
    assert [call["dropout_p"] for call in calls] == [0.3, 0.3]


def test_a_mask_from_outside_s2_mask_gets_the_layout_of_its_own_call():
    """A mask that `s2_mask` did not make (a 4D mask built by the caller, or None) belongs to no forward pass:
    each call reads the tensors it is given, even a buffer whose contents changed without a new tensor."""
    heads, n = 4, 24
    query, key, value = qkv(1, heads, 2, n)
    position_ids = torch.cat([torch.arange(11), torch.arange(13)])[None]
    s2_attention_forward(attention_module(), query, key, value, None, position_ids=position_ids)
    # A data loader refilling a shared buffer in place, here through NumPy (which autograd does not see).
    position_ids.numpy()[:] = torch.cat([torch.arange(17), torch.arange(7)]).numpy()
    out, _ = s2_attention_forward(attention_module(), query, key, value, None, position_ids=position_ids)
    mask = s2_reference_mask(torch.ones(1, n, dtype=torch.bool), heads, position_ids=position_ids)
    torch.testing.assert_close(out, masked_attention(query, key, value, mask), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("training,grad", [(False, True), (True, False)])
def test_eval_mode_and_no_grad_calls_are_exactly_sdpa(training, grad):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = qkv(2, 4, 2, 16)
    module = attention_module(training=training)
    module.num_key_value_groups = 2
    with torch.set_grad_enabled(grad):
        out, _ = s2_attention_forward(module, query, key, value, None, scaling=0.3)
        dense, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.3)
    assert torch.equal(out, dense)


def test_a_kv_cache_call_is_dense_even_in_training():
    query, _, _ = qkv(1, 4, 4, 1)
    _, key, value = qkv(1, 4, 4, 12, seed=1)
    out, _ = s2_attention_forward(attention_module(), query, key, value, None)
    full = torch.ones(1, 4, 1, 12, dtype=torch.bool)
    torch.testing.assert_close(out, masked_attention(query, key, value, full), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (15, 5), (3, 1), (5, 5), (9, 9), (7, 1)])
@pytest.mark.parametrize("flash", [False, True], ids=["sdpa", "flash"])
def test_an_odd_number_of_heads_shifts_heads_h_over_2_to_h_as_the_reference_code(heads, kv_heads, flash, monkeypatch):
    """SmolLM2-135M (9 query / 3 kv heads) and -360M (15 / 5): heads [0, H // 2) unshifted, [H // 2, H) shifted,
    a kv head serving both halves read by each; on the SDPA path and the flash varlen path (a CPU stand-in)."""
    n = 32
    query, key, value = qkv(2, heads, kv_heads, n)
    if flash:
        monkeypatch.setattr(s2, "_load_flash_varlen", lambda: varlen_stand_in([]))
    module = attention_module(inner_attn_implementation="flash_attention_2" if flash else "sdpa")
    out, _ = s2_attention_forward(module, query, key, value, None)
    mask = s2_reference_mask(torch.ones(2, n, dtype=torch.bool), heads)
    assert mask[0, heads // 2 - 1].ne(mask[0, heads // 2]).any()  # the reference does split there
    torch.testing.assert_close(out, masked_attention(query, key, value, mask), atol=TOLERANCE, rtol=0)


def reference_with_sinks(query, key, value, mask, sinks):
    """The float64 reference of attention with one sink logit per head (gpt-oss's eager attention): the sink joins
    each softmax as an extra column and is dropped from the weights."""
    query, key, value = (x.double() for x in (query, key, value))
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, -math.inf)
    sink = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return (weights @ value).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3), (4, 1)])
@pytest.mark.parametrize("flash", [False, True], ids=["sdpa", "flash"])
@pytest.mark.parametrize("window", [None, 5])
def test_attention_sinks_join_the_softmax_of_every_group(heads, kv_heads, flash, window, monkeypatch):
    """gpt-oss passes one sink logit per head (`s_aux`): S2 keeps it in each group's softmax, on both inner kernels
    (the flash path runs sinks through SDPA: flash-attn's varlen API has none), with sliding windows too."""
    n = 32
    query, key, value = qkv(2, heads, kv_heads, n, requires_grad=True)
    sinks = torch.randn(heads, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    calls = []
    monkeypatch.setattr(s2, "_load_flash_varlen", lambda: varlen_stand_in(calls))
    module = attention_module(inner_attn_implementation="flash_attention_2" if flash else "sdpa")
    out, _ = s2_attention_forward(module, query, key, value, None, s_aux=sinks, sliding_window=window)
    mask = s2_reference_mask(torch.ones(2, n, dtype=torch.bool), heads, sliding_window=window)
    expected = reference_with_sinks(query, key, value, mask, sinks)
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=0)
    assert calls == []  # no flash call could have honoured the sinks
    got = torch.autograd.grad(out.sum(), sinks)[0]
    torch.testing.assert_close(got, torch.autograd.grad(expected.sum(), sinks)[0], atol=TOLERANCE, rtol=0)
    assert (out - masked_attention(query, key, value, mask)).abs().max() > 1e-3  # the sinks matter here


@pytest.mark.parametrize("kv_len", [16, 20])
def test_dense_attention_with_sinks_keeps_them_in_evaluation_and_with_a_cache(kv_len):
    """transformers' SDPA function ignores `s_aux`: S2's dense path (evaluation, generation) computes them itself."""
    query, _, _ = qkv(1, 4, 2, 16)
    _, key, value = qkv(1, 4, 2, kv_len, seed=1)
    sinks = torch.randn(4, dtype=torch.float64)
    out, _ = s2_attention_forward(attention_module(training=False), query, key, value, None, s_aux=sinks)
    causal = torch.ones(16, kv_len, dtype=torch.bool).tril(kv_len - 16).expand(1, 4, 16, kv_len)
    torch.testing.assert_close(out, reference_with_sinks(query, key, value, causal, sinks), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("window", [None, 5])
def test_dense_attention_with_sinks_and_flash_as_the_inner_backend_keeps_them(window, monkeypatch):
    """transformers' flash-attn function drops `s_aux`: with flash inner, evaluation computes the sinks itself from
    the flash mask (2D padding), the causal rule and the sliding window, and calls no flash kernel."""
    n = 16
    query, key, value = qkv(2, 4, 2, n)
    sinks = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    real = torch.arange(n)[None, :] >= torch.tensor([0, 3])[:, None]  # the second row left-padded
    monkeypatch.setitem(s2.ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", None)  # a call would fail
    module = attention_module(training=False, inner_attn_implementation="flash_attention_2")
    out, _ = s2_attention_forward(module, query, key, value, real.long(), s_aux=sinks, sliding_window=window)
    allowed = padding_mask_4d(real)
    if window is not None:
        allowed = allowed & (torch.arange(n)[None, :] > torch.arange(n)[:, None] - window)
    expected = reference_with_sinks(query, key, value, allowed.expand(2, 4, n, n), sinks)
    torch.testing.assert_close(out[real], expected[real], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "argument", [dict(softcap=30.0), dict(head_mask=torch.ones(4)), dict(attention_bias=torch.zeros(1, 4, 16, 16))]
)
def test_an_attention_argument_s2_does_not_implement_is_refused_in_training(argument):
    query, key, value = qkv(1, 4, 4, 16)
    name = next(iter(argument))
    message = rf"does not implement the attention argument {name}=.*would ignore it.*use_s2_attn=False"
    with pytest.raises(ValueError, match=message):
        s2_attention_forward(attention_module(), query, key, value, None, **argument)


def test_bookkeeping_arguments_and_unset_ones_pass():
    query, key, value = qkv(1, 4, 4, 16)
    out, _ = s2_attention_forward(
        attention_module(),
        query,
        key,
        value,
        None,
        softcap=None,
        use_cache=False,
        output_attentions=False,
        cache_position=torch.arange(16),
        position_ids=torch.arange(16)[None],
    )
    mask = s2_reference_mask(torch.ones(1, 16, dtype=torch.bool), 4)
    torch.testing.assert_close(out, masked_attention(query, key, value, mask), atol=TOLERANCE, rtol=0)


def test_non_causal_attention_is_refused_in_training():
    query, key, value = qkv(1, 4, 4, 16)
    module = attention_module()
    module.is_causal = False
    message = r"causal language models.* is non-causal \(is_causal=False.*use_s2_attn=False.*--use_s2_attn false"
    with pytest.raises(ValueError, match=message):
        s2_attention_forward(module, query, key, value, None)


@pytest.mark.parametrize("ratio", [0, 1.5, -0.25, "0.25", True])
def test_group_size_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match=rf"group_size_ratio must be a number in \(0, 1\]; got {ratio!r}"):
        S2AttentionSettings(group_size_ratio=ratio)


def test_shift_must_be_a_boolean():
    with pytest.raises(ValueError, match="shift must be True or False; got 'yes'"):
        S2AttentionSettings(shift="yes")


@pytest.mark.parametrize("group_size", [1, 0, -4, 2.5])
def test_group_size_below_two_is_refused(group_size):
    with pytest.raises(ValueError, match=rf"group_size must be an integer of at least 2 tokens; got {group_size!r}"):
        S2AttentionSettings(group_size=group_size)


def test_unknown_inner_backend_is_refused():
    with pytest.raises(ValueError, match="inner_attn_implementation must be one of .*'eager'"):
        S2AttentionSettings(inner_attn_implementation="eager")


def test_under_sequence_parallelism_a_dense_call_without_a_mask_keeps_the_documents_its_position_ids_mark(monkeypatch):
    """DeepSpeed's wrapper drops every mask, in evaluation too: the dense path reads the packed documents (and pads
    given restarting position ids, as TRL's collator makes them) from the position ids."""
    monkeypatch.setattr(s2, "ulysses_group", lambda: (0, 2))  # this process runs sequence parallelism
    heads, n = 4, 24
    query, key, value = qkv(2, heads, 2, n)
    position_ids = torch.stack(
        [
            torch.cat([torch.arange(11), torch.arange(13)]),
            torch.cat([torch.arange(20), torch.zeros(4, dtype=torch.long)]),
        ]
    )
    out, _ = s2_attention_forward(attention_module(training=False), query, key, value, None, position_ids=position_ids)
    mask = padding_mask_4d(torch.ones(2, n, dtype=torch.bool), position_ids).expand(2, heads, n, n)
    torch.testing.assert_close(out, masked_attention(query, key, value, mask), atol=TOLERANCE, rtol=0)


def test_without_sequence_parallelism_a_dense_call_without_a_mask_is_the_inner_backends():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = qkv(1, 4, 2, 24)
    module = attention_module(training=False)
    module.num_key_value_groups = 2
    position_ids = torch.cat([torch.arange(11), torch.arange(13)])[None]
    out, _ = s2_attention_forward(module, query, key, value, None, position_ids=position_ids)
    dense, _ = sdpa_attention_forward(module, query, key, value, None, position_ids=position_ids)
    assert torch.equal(out, dense)


def test_calls_without_a_mask_share_a_layout_when_their_position_ids_have_the_same_values(monkeypatch):
    """DeepSpeed's wrapper gathers a new position-id tensor for every layer: the layout is built once for them."""
    built = []
    original = s2.s2_layout
    monkeypatch.setattr(s2, "s2_layout", lambda *a, **k: built.append(1) or original(*a, **k))
    monkeypatch.setattr(s2, "_without_mask", [])  # nothing remembered from other tests
    query, key, value = qkv(1, 4, 2, 24)
    ids = torch.cat([torch.arange(11), torch.arange(13)])[None]
    for _ in range(3):  # three layers, each with its own copy
        s2_attention_forward(attention_module(), query, key, value, None, position_ids=ids.clone())
    assert len(built) == 1
    s2_attention_forward(attention_module(), query, key, value, None, position_ids=torch.arange(24)[None])
    assert len(built) == 2


@pytest.mark.parametrize(
    "heads,kv_heads,ranks", [(4, 2, 2), (4, 1, 2), (6, 3, 3), (8, 4, 4), (18, 9, 3), (4, 1, 4), (9, 3, 3), (15, 5, 5)]
)
def test_a_sequence_parallel_rank_runs_its_heads_as_the_whole_model_runs_them(heads, kv_heads, ranks, monkeypatch):
    """Each rank of DeepSpeed's Ulysses gets the whole sequence for heads [r*H/P, (r+1)*H/P) and their kv heads
    (repeated when there are fewer kv heads than ranks): its output is that slice of the single-process output,
    also where the unshifted/shifted boundary falls inside a rank (6/3 heads over 3, 18/9 over 3, and the odd
    SmolLM2 shapes 9/3 over 3 and 15/5 over 5, whose boundary H // 2 falls inside a rank)."""
    n = 48
    query, key, value = qkv(2, heads, kv_heads, n)
    module = attention_module()
    module.config.num_attention_heads = heads
    whole, _ = s2_attention_forward(module, query, key, value, None)
    expected = s2_reference_mask(torch.ones(2, n, dtype=torch.bool), heads)
    torch.testing.assert_close(whole, masked_attention(query, key, value, expected), atol=TOLERANCE, rtol=0)
    share = heads // ranks
    repeat = max(ranks // kv_heads, 1)  # DeepSpeed repeats each kv head over `repeat` ranks
    kv_share = max(kv_heads // ranks, 1)
    for rank in range(ranks):
        monkeypatch.setattr(sequence_parallel, "ulysses_group", lambda rank=rank: (rank, ranks))
        kv = (
            slice((rank // repeat) * kv_share, (rank // repeat + 1) * kv_share)
            if repeat > 1
            else slice(rank * kv_share, (rank + 1) * kv_share)
        )
        out, _ = s2_attention_forward(
            module,
            query[:, rank * share : (rank + 1) * share],
            key[:, kv],
            value[:, kv],
            None,
            position_ids=torch.arange(n)[None],
        )
        torch.testing.assert_close(out, whole[:, :, rank * share : (rank + 1) * share], atol=TOLERANCE, rtol=0)
