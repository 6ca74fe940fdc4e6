"""Every decoder `*ForCausalLM` of the installed transformers that declares attention-backend support, built tiny
from its own default config, and what S2-Attn does with it: the support module of `test_every_architecture.py`.

`python tests/support/architectures.py` prints the outcome of every architecture and the summary line for the
README (`summary()`).
"""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from functools import cache  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support.s2_reference as a script
import longlora_hf  # noqa: E402  (registers "s2")
from longlora_hf.attention import use_s2_attention  # noqa: E402
from support.s2_reference import s2_reference_mask  # noqa: E402


LONGLORA_HF = str(Path(longlora_hf.__file__).resolve().parent)

SEQ = 32
LENGTHS = (SEQ, 23)  # a padded batch: the second row has 9 pads; its groups are int(23 x 0.25) = 5 tokens
GROUP_SIZE_RATIO = 0.25  # 4 groups of 8 tokens in the full row
VOCAB = 128
# Relative to the logits' scale. Models and S2 run in float64, but many eager functions (the reference's) take their
# softmax in float32: the reference is off by ~1e-7. A wrong partition is off by ~1e-2 or more (`dense_diff`).
TOLERANCE = 1e-6


# ---------------------------------------------------------------------------------------------------- enumeration


@dataclasses.dataclass(frozen=True)
class Architecture:
    model_type: str
    model_class: type
    config_class: type


MODALITY_SUB_CONFIGS = {"text_config", "vision_config", "audio_config"}


def _declares_text_config(config_class) -> bool:
    return "text_config" in (getattr(config_class, "sub_configs", None) or {})


def _is_multimodal(config_class) -> bool:
    return bool(MODALITY_SUB_CONFIGS & set(getattr(config_class, "sub_configs", None) or {}))


@cache
def enumerate_architectures() -> tuple[dict[str, Architecture], dict[str, str]]:
    """(architectures under test by model_type, model types left out -> the rule that leaves them out).

    From transformers' own causal-LM mapping. Left out, by rules read off transformers' classes:
    - classes that do not declare `_supports_attention_backend` (they never call an attention backend);
    - multimodal or assistant models: classes whose own config class holds a `text_config`, `vision_config` or
      `audio_config` (they take images, audio or another model's states; the text decoder inside, where the
      mapping has one, is tested under its own model type);
    - a model type that maps to the same model class and text config class as another one (`llama4` and
      `llama4_text`): the same model, tested once.
    A model type whose config holds a `text_config` while its model class takes the text config alone (`mllama`,
    `emu3`: their `*ForCausalLM` is the text decoder) is built from that text config.
    """
    architectures, left_out, seen = {}, {}, {}
    # A duplicate keeps the name of the model type its config class is named for (`gpt2`, not `gpt-sw3`;
    # `llama4_text`, not `llama4`).
    order = sorted(
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        key=lambda t: (_declares_text_config(CONFIG_MAPPING[t]), CONFIG_MAPPING[t].model_type != t),
    )
    for model_type in order:
        model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        if not getattr(model_class, "_supports_attention_backend", False):
            left_out[model_type] = "does not declare _supports_attention_backend"
            continue
        if _is_multimodal(model_class.config_class):
            held = sorted(MODALITY_SUB_CONFIGS & set(model_class.config_class.sub_configs))
            holder = model_class.config_class.__name__
            left_out[model_type] = f"multimodal or assistant: {holder} holds {', '.join(held)}"
            continue
        config_class = CONFIG_MAPPING[model_type]
        if _declares_text_config(config_class):
            config_class = model_class.config_class
        key = (model_class, config_class)
        if key in seen:
            left_out[model_type] = f"same model class and config class as {seen[key]}"
            continue
        seen[key] = model_type
        architectures[model_type] = Architecture(model_type, model_class, config_class)
    return dict(sorted(architectures.items())), dict(sorted(left_out.items()))


# ------------------------------------------------------------------------------------------------------ tiny configs

# Widths: 4 query heads of 8 (two halves of 2 heads), 2 key/value heads (GQA), 8 experts of which 2 routed.
SIZES = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim_model_base"), 32),
    **dict.fromkeys(
        (
            "intermediate_size",
            "n_inner",
            "ffn_dim",
            "dff",
            "ffn_hidden_size",
            "intermediate_size_mlp",
            "dense_intermediate_size",
        ),
        64,
    ),
    **dict.fromkeys(
        (
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "shared_intermediate_size",
            "shared_experts_intermediate_size",
            "expert_ffn_hidden_size",
        ),
        16,
    ),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_attention_heads_per_layer", "index_n_heads"), 4),
    **dict.fromkeys(("num_key_value_heads",), 2),
    **dict.fromkeys(("head_dim", "qk_head_dim", "kv_channels", "v_head_dim", "qk_nope_head_dim", "index_head_dim"), 8),
    **dict.fromkeys(("qk_rope_head_dim", "rotary_dim"), 4),
    **dict.fromkeys(("kv_lora_rank", "o_lora_rank"), 16),
    "q_lora_rank": 24,
    **dict.fromkeys(("laurel_rank", "index_topk"), 8),  # index_topk: fewer keys than the sequence, so it selects
    "o_groups": 2,
    "zero_expert_num": 2,
    "router_hidden_size": 32,
    **dict.fromkeys(("pronunciation_vocab_size", "shape_vocab_size"), 32),
    **dict.fromkeys(("pronunciation_embed_dim", "shape_embed_dim"), 16),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 8),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "moe_k"), 2),
    "n_group": 4,
    "topk_group": 2,
    **dict.fromkeys(("vocab_size", "vocab_size_per_layer_input"), VOCAB),
    **dict.fromkeys(("hidden_size_per_layer_input", "embedding_size", "word_embed_proj_dim", "lru_width"), 32),
    # Sliding windows and attention chunks shorter than a group, so that they matter inside the groups.
    "sliding_window": 6,
    "attention_window_size": 6,
    "attention_chunk_size": 12,
}
# Counts that switch a feature on when positive: kept positive, at 1.
AT_MOST_ONE = (
    "n_shared_experts",
    "num_shared_experts",
    "moe_num_shared_experts",
    "first_k_dense_replace",
    "num_dense_layers",
    "num_nextn_predict_layers",
    "num_kv_shared_layers",
)
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
TOKEN_IDS = {"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3}
STOCHASTIC = re.compile(r"(dropout|_pdrop|jitter|layerdrop|drop_path)")


def _layer_count(config) -> tuple[str, int] | None:
    for name in LAYER_COUNTS:
        if isinstance(getattr(config, name, None), int):
            return name, getattr(config, name)
    return None


def _is_layer_index_list(values, layers: int) -> bool:
    """`moe_layers=[0, 1, ...]`, `cross_attention_layers=[3, 8, ...]`: the indices of the layers of one kind."""
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    return bool(values) and ints and values == sorted(set(values)) and values[-1] < layers


def tiny_config_kwargs(config) -> dict:
    """The keyword arguments that shrink a default `config`: the sizes above where the config has the field,
    dropout and jitter off, small token ids; and the fewest layers that keep every kind of layer of the default
    model. Lists with one entry per layer (`layer_types`, `mlp_layer_types`...) are cut to their shortest prefix
    that holds each of their values; lists of layer indices (`moe_layers`) keep the indices below the new count,
    at least their first."""
    kwargs = {}
    for name, value in vars(config).items():
        if name.startswith("_"):
            continue
        if name in SIZES and isinstance(value, int) and not isinstance(value, bool):
            kwargs[name] = SIZES[name]
        elif name in AT_MOST_ONE and isinstance(value, int) and value > 1:
            kwargs[name] = 1
        elif name in TOKEN_IDS and value is not None:
            kwargs[name] = [TOKEN_IDS[name]] if isinstance(value, list) else TOKEN_IDS[name]
        elif STOCHASTIC.search(name) and isinstance(value, float):
            kwargs[name] = 0.0
    if isinstance(vars(config).get("kv_lora_rank"), int):  # vars: per-layer configs refuse getattr
        # Multi-head latent attention makes a key and a value per query head: as many kv heads as query heads.
        kwargs["num_key_value_heads"] = SIZES["num_attention_heads"]
        if vars(config).get("head_dim") == vars(config).get("qk_rope_head_dim", 0):
            kwargs["head_dim"] = SIZES["qk_rope_head_dim"]  # DeepSeek's configs name the RoPE part head_dim
        if isinstance(vars(config).get("qk_head_dim"), int):
            kwargs["qk_head_dim"] = SIZES["qk_nope_head_dim"] + SIZES["qk_rope_head_dim"]
    counted = _layer_count(config)
    if counted is None:
        return kwargs
    name, layers = counted
    lists = {k: v for k, v in vars(config).items() if not k.startswith("_") and isinstance(v, list) and v}
    indices = {k: v for k, v in lists.items() if _is_layer_index_list(v, layers)}
    per_layer = {k: v for k, v in lists.items() if len(v) == layers and k not in indices}
    keep = 2
    for values in per_layer.values():
        seen = set()
        for index, value in enumerate(map(repr, values)):
            if value not in seen:
                seen.add(value)
                keep = max(keep, index + 1)
    keep = max([keep] + [values[0] + 1 for values in indices.values()])
    kwargs[name] = min(keep, layers)
    for k, values in per_layer.items():
        kwargs[k] = [SIZES[k]] * kwargs[name] if k in SIZES else values[: kwargs[name]]  # per-layer widths
    for k, values in indices.items():
        kwargs[k] = [index for index in values if index < kwargs[name]]
    return kwargs


# Default configs of transformers 5.24 that do not build a model even at full size, and the least that does.
DEFAULT_FIXES: dict[str, dict] = {
    # rope_parameters defaults to {}, while the rotary embedding reads one entry per layer type.
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # DbrxAttentionConfig has no rope_theta, which the attention reads, and clip_qkv=None, with which its forward
    # fails (a clamp with neither bound); DBRX's checkpoints use 500000 and 8.
    "dbrx": dict(attn_config=dict(kv_n_heads=8, rope_theta=500000.0, clip_qkv=8.0)),
    # num_experts_per_tok defaults to None, with which the router's top-k fails; DeepSeek-V2 routes 6 experts.
    "deepseek_v2": dict(num_experts_per_tok=6),
    # head_dim defaults to None, which the attention raises to a power: hidden_size / num_attention_heads = 128.
    "hunyuan_v1_dense": dict(head_dim=128),
    "hunyuan_v1_moe": dict(head_dim=128),
    "ministral": dict(head_dim=128),
    # num_key_value_heads defaults to None, which the attention divides by; Nemotron-4 has 8.
    "nemotron": dict(num_key_value_heads=8),
    # The expert counts default to None, which size the expert weights; dots.llm1 routes 6 of 128, with 2 shared.
    "dots1": dict(n_routed_experts=128, num_experts_per_tok=6, n_shared_experts=2),
    # layer_types defaults to None, which the layers index; LFM2-8B-A1B interleaves conv and attention layers.
    "lfm2_moe": dict(layer_types=["conv", "conv", "full_attention"] * 10 + ["conv", "conv"]),
}

# Per-architecture settings of the tiny model that the generic shrinking cannot derive, each with the reason.
TINY_OVERRIDES: dict[str, dict] = {
    # DBRX keeps its attention and expert sizes in sub-configs.
    "dbrx": dict(
        attn_config=dict(kv_n_heads=2, rope_theta=500000.0, clip_qkv=8.0),
        ffn_config=dict(hidden_size=32, ffn_hidden_size=64, moe_num_experts=8, moe_top_k=2),
    ),
    # Its validator requires as many key/value heads as query heads; its sliding layers take their sizes from
    # `swa_*` keys (per-layer configs), whose defaults are full size.
    "dots3_note_text": dict(
        num_key_value_heads=4,
        swa_num_attention_heads=4,
        swa_num_key_value_heads=4,
        swa_q_lora_rank=24,
        swa_kv_lora_rank=16,
        swa_head_dim=12,
        swa_qk_nope_head_dim=8,
        swa_v_head_dim=8,
    ),
    # The default has Mamba layers only; one attention layer is what S2 trains. Mamba heads must tile 2 x hidden.
    "granitemoehybrid": dict(
        layer_types=["linear_attention", "attention"],
        num_hidden_layers=2,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_chunk_size=16,
    ),
    # Its layers repeat block_types (recurrent, recurrent, attention): 2 layers would hold no attention layer.
    "recurrent_gemma": dict(num_hidden_layers=3),
    # ZAYA routes each token to one expert only.
    "zaya": dict(num_experts_per_tok=1),
}


# Architectures whose tiny model cannot run here, with what stops them (a regex of the outcome's reason). The tests
# hold this against reality: an entry that starts running fails them until it is removed.
CANNOT_RUN_TINY: dict[str, str] = {
    # Its looped layers attend over the last loop's keys as well (37 keys) under a mask made for the 32 tokens:
    # transformers' Dory fails a padded training forward under its own sdpa and eager alike.
    "dory": r"its own dense training fails: RuntimeError .*size of tensor a \(37\) must match .* b \(32\)",
}


def default_config(arch: Architecture):
    """The architecture's default config (with `DEFAULT_FIXES` where transformers' own default does not build)."""
    return arch.config_class(**DEFAULT_FIXES.get(arch.model_type, {}))


def tiny_config(arch: Architecture):
    kwargs = {
        **DEFAULT_FIXES.get(arch.model_type, {}),
        **tiny_config_kwargs(default_config(arch)),
        **TINY_OVERRIDES.get(arch.model_type, {}),
    }
    return arch.config_class(**kwargs, experts_implementation="eager")  # grouped_mm has no float64 on the CPU


def tiny_model(arch: Architecture, seed: int = 0):
    """A tiny float64 model of `arch`, in eval mode."""
    torch.manual_seed(seed)
    return arch.model_class(tiny_config(arch)).double().eval()


# ------------------------------------------------------------------------------------------------------- reference


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch: input ids [2, SEQ] and attention mask, rows of LENGTHS real tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (len(LENGTHS), SEQ), generator=generator)
    attention_mask = (torch.arange(SEQ)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return ids, attention_mask


REFERENCE = "s2_reference_eager"
_reference_calls: list[str] = []

# S2-Attn as longlora_hf defines it keeps two kinds of attention call dense in training, under the model's own mask:
# calls whose keys outnumber their queries (a cache; Dory's earlier loops attending over the last loop's keys), and
# layers whose own mask confines attention to blocks (Llama 4's chunks of attention_chunk_size tokens: "chunked
# layers train as they are"). The reference does the same; partitioning Llama 4's chunked layers would put it 0.46
# off S2.
OWN_ATTENTION_LAYER_TYPES = frozenset({"chunked_attention"})


def _layer_type(module) -> str | None:
    layer_types, index = getattr(module.config, "layer_types", None), getattr(module, "layer_idx", None)
    return layer_types[index] if layer_types is not None and isinstance(index, int) else None


def _reference_mask(*args, **kwargs):
    """The model's own mask (causal, sliding-window, chunked, padding), always materialised, True = attend."""
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})


def _reference_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs
):
    """The model's own eager attention under its own mask intersected with the S2 partition of the reference.

    The partition comes from `s2_reference_mask` (shares no code with longlora_hf), the rest is the model's: its
    `eager_attention_forward` applies its sinks, soft-capping, scaling and head layout exactly as it does densely.
    """
    eager = sys.modules[type(module).__module__].eager_attention_forward
    _reference_calls.append(type(module).__name__)
    _, attention_mask_2d = inputs()
    own = None if attention_mask is None else attention_mask[..., -key.shape[-2] :].bool()
    if query.shape[-2] != key.shape[-2] or _layer_type(module) in OWN_ATTENTION_LAYER_TYPES:
        allowed = own  # the call stays dense (see OWN_ATTENTION_LAYER_TYPES)
    else:
        partition = s2_reference_mask(
            attention_mask_2d.bool(), query.shape[1], group_size_ratio=GROUP_SIZE_RATIO, sliding_window=sliding_window
        )
        allowed = partition if own is None else partition & own
    if allowed is None:
        return eager(
            module, query, key, value, None, scaling=scaling, dropout=0.0, sliding_window=sliding_window, **kwargs
        )
    # Many eager functions take their softmax in float32: a float64 minimum would become -inf there, and a fully
    # masked (padding) row NaN, which the next layer's values would carry into the real tokens.
    additive = torch.zeros(allowed.shape, dtype=query.dtype).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return eager(
        module, query, key, value, additive, scaling=scaling, dropout=0.0, sliding_window=sliding_window, **kwargs
    )


def register_reference() -> None:
    AttentionInterface.register(REFERENCE, _reference_attention)
    AttentionMaskInterface.register(REFERENCE, _reference_mask)


# --------------------------------------------------------------------------------------------------------- outcome

# What longlora_hf says when it refuses an architecture, by reason. A refusal matching none of them is not clear.
REFUSALS = {
    "odd number of attention heads": r"S2-Attn splits the attention heads into two halves, so their number must be",
    "non-causal (an encoder)": r"S2-Attn is for causal language models .* is non-causal",
    "attention logit soft-capping": r"S2-Attn does not support attention logit soft-capping"
    r"|S2-Attn does not implement the attention argument softcap=",
    "sparse-attention indexer": r"chooses the keys each query attends to with its own indexer"
    r"|uses the attention mask as a tensor inside its layers",
    "no attention backend": r"does not dispatch attention through transformers' AttentionInterface",
    "no attention projections for LoRA": r"Found no attention projections in",
    "an attention argument S2 does not implement": r"S2-Attn does not implement the attention argument",
}

EXACT, REFUSED, WRONG, CANNOT_RUN = "exact", "refused", "wrong", "cannot run tiny"


@dataclasses.dataclass
class Outcome:
    model_type: str
    status: str = WRONG  # EXACT, REFUSED, WRONG (silently wrong, or an error that is no clear refusal), CANNOT_RUN
    reason: str = ""
    message: str = ""  # a refusal's own words, with its advice
    train_diff: float | None = None  # S2 against the reference, training, real tokens
    dense_diff: float | None = None  # dense training against the reference: what a wrong partition would cost
    eval_diff: float | None = None  # S2 against the dense backend, evaluation
    unreached: list[str] = dataclasses.field(default_factory=list)  # trainable, no gradient under S2 nor dense

    def __str__(self) -> str:
        if self.status == EXACT:
            return (
                f"{EXACT} (training off by {self.train_diff:.0e}; "
                f"a wrong partition would be off by {self.dense_diff:.0e})"
            )
        return f"{self.status}: {self.reason}"


def refusal_reason(error: BaseException) -> str | None:
    """The reason of a clear refusal: a ValueError/TypeError raised in longlora_hf whose message names a reason
    of REFUSALS; None for any other error."""
    raised_in = traceback.extract_tb(error.__traceback__)[-1].filename if error.__traceback__ else ""
    if not isinstance(error, (ValueError, TypeError)) or not raised_in.startswith(LONGLORA_HF):
        return None
    return next((reason for reason, pattern in REFUSALS.items() if re.search(pattern, str(error), re.S)), None)


def _describe(error: BaseException) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(error).__name__}{where}: {(str(error).splitlines() or [''])[0][:200]}"


def _real_logits(model, ids, attention_mask):
    torch.manual_seed(0)  # any randomness left in training (routing noise) draws the same numbers each time
    return model(input_ids=ids, attention_mask=attention_mask).logits[attention_mask.bool()]


def _dense_logits(model, base, ids, attention_mask) -> tuple[str, torch.Tensor]:
    """(backend, logits) under sdpa, S2's inner backend; under the model's own eager attention where sdpa
    refuses the model (no declared support, or a feature it lacks: Gemma 2's soft-capping)."""
    try:
        base.set_attn_implementation("sdpa")
        return "sdpa", _real_logits(model, ids, attention_mask)
    except (ValueError, TypeError, NotImplementedError):
        base.set_attn_implementation("eager")
        return "eager", _real_logits(model, ids, attention_mask)


def _reached(model) -> set[str]:
    """The trainable tensors with a nonzero gradient; clears the gradients."""
    reached = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.any()}
    model.zero_grad(set_to_none=True)
    return reached


def _lora_plus_groups(model, base) -> dict[str, list[str]]:
    """The trainable tensors by kind: LoRA factors, the input embedding, the norms (the other LoRA+ modules)."""
    embedding = next(name for name, module in model.named_modules() if module is base.get_input_embeddings())
    groups = {"LoRA factors": [], "input embedding": [], "norms": []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            kind = "LoRA factors" if ".lora_" in name else "input embedding" if name.startswith(embedding) else "norms"
            groups[kind].append(name)
    return groups


@contextmanager
def one_thread():
    """Tiny models run fastest on one thread; with several xdist workers on few cores, torch's thread pools would
    also oversubscribe the cores (a 0.3 s test took 14 s). Restored after, for the rest of the suite."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def outcome(arch: Architecture) -> Outcome:
    """What S2-Attn does with `arch`: one tiny LongLoRA training step in float64 on a padded batch.

    Exact when
    1. training: S2's logits equal the reference's (the model's own eager attention under its own mask and the
       explicit S2 partition) on the real tokens, within TOLERANCE of their scale; while dense training is far
       from the reference, so that the comparison can tell;
    2. gradients: the LoRA factors, the input embedding and the norms are reached, and S2 leaves no trainable
       tensor without a gradient that dense training gives one (Mllama's cross-attention gets none without images);
    3. evaluation: S2's logits equal the inner backend's (sdpa) exactly, or the model's eager attention's within
       TOLERANCE where sdpa refuses the model (gpt-oss, Gemma 2).
    Refused when longlora_hf raises a clear refusal (`refusal_reason`) on the way.
    """
    with one_thread():
        return _outcome(arch)


def _outcome(arch: Architecture) -> Outcome:
    from peft import get_peft_model

    result = Outcome(arch.model_type)
    try:
        model = tiny_model(arch)
    except Exception as error:  # noqa: BLE001 - recorded; the tests hold it against CANNOT_RUN_TINY
        return Outcome(arch.model_type, CANNOT_RUN, f"does not build: {_describe(error)}")
    register_reference()
    ids, attention_mask = inputs()
    base = model
    step = "LongLoRA"
    lora_refused = None
    try:
        try:
            model = get_peft_model(
                model, longlora_hf.LongLoraConfig(group_size_ratio=GROUP_SIZE_RATIO, init_lora_weights=False)
            )  # LoRA B nonzero
        except ValueError as error:
            lora_refused = refusal_reason(error)
            if lora_refused != "no attention projections for LoRA":
                raise
            # LoRA finds nothing to adapt, but S2 may still be used (with target_modules): S2 is checked alone.
            use_s2_attention(model, group_size_ratio=GROUP_SIZE_RATIO)
        model.train()
        step = "dense training"
        try:
            dense, dense_logits = _dense_logits(model, base, ids, attention_mask)
            dense_logits.pow(2).mean().backward()
        except Exception as error:  # noqa: BLE001
            return Outcome(arch.model_type, CANNOT_RUN, f"its own dense training fails: {_describe(error)}")
        reached_dense = _reached(model)
        step = "reference"
        with torch.no_grad():
            _reference_calls.clear()
            base.set_attn_implementation(REFERENCE)
            expected = _real_logits(model, ids, attention_mask)
            calls = len(_reference_calls)
        step = "S2 training"
        base.set_attn_implementation("s2")
        got = _real_logits(model, ids, attention_mask)
        got.pow(2).mean().backward()
        reached = _reached(model)
        step = "S2 evaluation"
        model.eval()
        with torch.no_grad():
            s2_eval = _real_logits(model, ids, attention_mask)
            base.set_attn_implementation(dense)
            dense_eval = _real_logits(model, ids, attention_mask)
    except Exception as error:  # noqa: BLE001 - a refusal, or an error that is itself the finding
        reason = refusal_reason(error)
        if reason is not None:
            return dataclasses.replace(result, status=REFUSED, reason=reason, message=str(error))
        result.reason = f"{step} fails, with no clear refusal: {_describe(error)}"
        return result
    scale = max(1.0, expected.abs().max().item())  # the reference's softmax is float32 where the model's eager is
    result.train_diff = (got - expected).abs().max().item() / scale
    result.dense_diff = (dense_logits.detach() - expected).abs().max().item() / scale
    result.eval_diff = (s2_eval - dense_eval).abs().max().item()
    trainable = _lora_plus_groups(model, base) if lora_refused is None else {"parameters": []}
    result.unreached = sorted(n for names in trainable.values() for n in names if n not in reached | reached_dense)
    problems = []
    if calls == 0:
        problems.append("no layer called the attention interface")
    if not result.train_diff <= TOLERANCE:
        problems.append(f"training is off the reference by {result.train_diff:.1e}")
    if not result.dense_diff > 100 * TOLERANCE:
        problems.append(f"insensitive: dense training is only {result.dense_diff:.1e} off the reference")
    lost = sorted(reached_dense - reached)
    if lost:
        problems.append(f"{len(lost)} trainable tensors get a gradient densely but none under S2, e.g. {lost[0]}")
    # OLMo's norms have no weights: a kind with no trainable tensor has nothing to reach.
    problems += [
        f"no gradient reaches the {kind}" for kind, names in trainable.items() if names and not set(names) & reached
    ]
    if not (result.eval_diff == 0 if dense == "sdpa" else result.eval_diff <= TOLERANCE * scale):
        problems.append(f"evaluation is off {dense} by {result.eval_diff:.1e}")
    if problems:
        result.reason = "; ".join(problems)
        return result
    if lora_refused is not None:
        return dataclasses.replace(result, status=REFUSED, reason=lora_refused)
    return dataclasses.replace(result, status=EXACT)


def train_without_s2(arch: Architecture) -> torch.Tensor:
    """The way out every S2 refusal names: LongLoRA with `use_s2_attn=False`, one training step on the batch's
    unpadded row (Gemma 2's own eager attention gives NaN on a left-padded row); the gradient of the first LoRA
    factor that gets one."""
    from peft import get_peft_model

    with one_thread():
        model = get_peft_model(
            tiny_model(arch), longlora_hf.LongLoraConfig(use_s2_attn=False, init_lora_weights=False)
        )
        model.train()
        ids = inputs()[0][:1]
        model(input_ids=ids, labels=ids).loss.backward()
        return next(p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None)


def train_plain(arch: Architecture) -> None:
    """The tiny model's own training step, without LongLoRA, on the row `train_without_s2` uses."""
    with one_thread():
        model = tiny_model(arch).train()
        ids = inputs()[0][:1]
        model(input_ids=ids, labels=ids).loss.backward()


def outcomes(model_types=None) -> dict[str, Outcome]:
    architectures, _ = enumerate_architectures()
    return {t: outcome(architectures[t]) for t in (model_types or architectures)}


def summary(results: dict[str, Outcome] | None = None) -> str:
    """ "N of M architectures train with S2 exactly, K refused (why)...", for the README."""
    results = outcomes() if results is None else results
    by_status = Counter(o.status for o in results.values())
    reasons = Counter(o.reason for o in results.values() if o.status == REFUSED)
    _, left_out = enumerate_architectures()
    rules = Counter(re.sub(r"( as |: ).*", "", reason) for reason in left_out.values())
    return "\n".join(
        [
            f"{by_status[EXACT]} of {len(results)} architectures train with S2 exactly, {by_status[REFUSED]} refused"
            + (f" ({'; '.join(f'{reason}: {n}' for reason, n in reasons.most_common())})" if reasons else "")
            + (
                f", {by_status[WRONG]} wrong or failing without a clear refusal, "
                f"{by_status[CANNOT_RUN]} cannot run tiny."
            ),
            f"Enumerated from transformers {transformers.__version__}: "
            f"{len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} model types "
            f"in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, {len(results)} tested, {len(left_out)} left out by rule ("
            + "; ".join(f"{rule}: {n}" for rule, n in rules.most_common())
            + ").",
        ]
    )


if __name__ == "__main__":
    results = {}
    for model_type in sys.argv[1:] or enumerate_architectures()[0]:
        results[model_type] = outcome(enumerate_architectures()[0][model_type])
        print(f"{model_type:24} {results[model_type]}", flush=True)
    print(summary(results))
