"""S2-Attn under DeepSpeed's Ulysses sequence parallelism (ALST): which attention heads a rank holds.

Under ALST each of P ranks holds 1/P of every sequence. Around attention an all-to-all hands each rank the
whole sequence for its share of the heads: rank r gets the query heads `[r*H/P, (r+1)*H/P)`, and the key/value
heads they read (DeepSpeed repeats key/value heads when there are fewer than P). S2 shifts the second half of
the heads by *global* index, `[H/2, H)`, so a rank needs the index of its first head: with P = 2 rank 0 holds
only unshifted heads and rank 1 only shifted ones; with P = 3 and H = 6 the boundary falls inside rank 1.

DeepSpeed's attention wrapper (`UlyssesSPAttentionHF`) calls the core attention function ("s2") without saying
which heads it passes, so `ulysses_group` reads DeepSpeed's sequence-parallel group: the one workaround here.
It goes when DeepSpeed passes the head range (or the sequence-parallel rank) to the core function.
"""

from __future__ import annotations

import sys


# DeepSpeed's module holding the Ulysses group that `UlyssesSPAttentionHF.register_with_transformers` creates.
ULYSSES_STATE_MODULE = "deepspeed.runtime.sequence_parallel.parallel_state_sp"


def ulysses_group() -> tuple[int, int] | None:
    """(rank, size) of this process in DeepSpeed's Ulysses sequence-parallel group, or None when there is none.
    Reads DeepSpeed's module only when something imported it (DeepSpeed is optional).

    Returns:
        `tuple[int, int]` or `None`: this process's rank in the group and the group's size; None when DeepSpeed's
        Ulysses group is not set up (no sequence parallelism).
    """
    state = sys.modules.get(ULYSSES_STATE_MODULE)
    if state is None or getattr(state, "_SEQUENCE_PARALLEL_GROUP", None) is None:
        return None
    return state.get_sequence_parallel_rank(), state.get_sequence_parallel_world_size()


def model_heads(config, heads_here: int) -> int:
    """The query heads of the whole model, from the attention module's config (its text config when it is
    composite); `heads_here` when the config does not say."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    total = getattr(config, "num_attention_heads", None)
    return total if isinstance(total, int) and not isinstance(total, bool) else heads_here


def heads_held(config, heads_here: int) -> tuple[int, int]:
    """(global index of the first query head of this call, query heads of the whole model).

    `heads_here` is the number of query heads the attention function received; `config` the attention module's
    config. All heads: (0, H). A 1/P share under Ulysses sequence parallelism: (rank * H/P, H). Any other share
    (a split S2 cannot place, e.g. tensor parallelism) is refused: S2 would shift the wrong heads."""
    total = model_heads(config, heads_here)
    if heads_here == total:
        return 0, total
    group = ulysses_group()
    if group is None or heads_here * group[1] != total:
        held = "no DeepSpeed sequence-parallel group" if group is None else f"a sequence-parallel group of {group[1]}"
        raise ValueError(
            f"S2-Attn received {heads_here} of the model's {total} query heads, with {held} in this process: S2 "
            "shifts heads by their index in the whole model, so it must know which heads a call holds. It knows that "
            "under DeepSpeed's Ulysses sequence parallelism (ALST) only; train other head splits (tensor parallelism) "
            "with attn_implementation='sdpa'."
        )
    rank, _ = group
    return rank * heads_here, total


def splits(heads: int, kv_heads: int, size: int) -> bool:
    """Whether DeepSpeed's Ulysses can split `heads` query and `kv_heads` key/value heads over `size` ranks: the
    query heads evenly, the key/value heads evenly or each repeated over a whole number of ranks."""
    return heads % size == 0 and (kv_heads % size == 0 or size % kv_heads == 0)


def valid_sp_sizes(heads: int, kv_heads: int, most: int = 64) -> list[int]:
    """The sequence-parallel sizes from 2 to `most` that split the heads (`splits`)."""
    return [size for size in range(2, most + 1) if splits(heads, kv_heads, size)]


def check_sequence_parallel_heads(config, sp_size: int, owner: str = "the model") -> None:
    """Refuse an `sp_size` that cannot split the model's attention heads, naming the sizes and the valid
    `sp_size` values. `config`: the model's config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if sp_size <= 1 or not isinstance(heads, int) or splits(heads, kv_heads, sp_size):
        return
    valid = valid_sp_sizes(heads, kv_heads)
    reason = (
        f"{heads} query heads do not split into {sp_size} equal shares"
        if heads % sp_size
        else f"its {kv_heads} key/value heads neither split into {sp_size} equal shares nor repeat evenly over "
        f"{sp_size} ranks"
    )
    raise ValueError(
        f"sp_size {sp_size} cannot split the attention of {owner} (num_attention_heads={heads}, "
        f"num_key_value_heads={kv_heads}): {reason}. Sequence parallelism gives each rank 1/sp_size of the heads. "
        f"Valid sp_size values: {', '.join(map(str, valid)) if valid else 'none above 1'}."
    )
