"""Tiny models of every architecture we support, built from configs with the real models' shapes, and
helpers the tests share. Imported by the tests (`from support.helpers import tiny_model`); `conftest.py` keeps the
fixtures only.

Nothing is downloaded: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

import longlora_hf  # noqa: E402,F401  (registers "s2")


COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    max_position_embeddings=256,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=3,
)

# name -> (config class, model class, extra config keys). 4 query heads everywhere (two halves of 2);
# the key/value head counts cover MHA, GQA and MQA.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1)),
    "mistral-sliding": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=6),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=8)),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6, layer_types=None),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=4)),
    "gpt-neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(num_attention_heads=4, rotary_pct=0.5, tie_word_embeddings=False),
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    # The entries below follow the shape conventions of real checkpoints, scaled down to the tiny widths.
    # Llama 3.1: llama3 RoPE, factor 8 over an original window 1/16 of max_position_embeddings
    # (8192 of 131072), so that with head_dim 8 one frequency stays, one is smoothed and two are scaled.
    "llama3-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 500000.0,
            },
        ),
    ),
    # Mixture of experts: Mixtral's 8 experts, top-2 routing, no sliding window (Mixtral-8x7B-v0.1).
    # Experts run "eager": the default grouped_mm kernel has no float64 on the CPU.
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            experts_implementation="eager",
        ),
    ),
    # Qwen3-MoE: q/k RMSNorm, explicit head_dim, many small experts (128 of which 8 routed, here 16 and
    # 4), normalized top-k probabilities, MoE in every layer.
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=16,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            experts_implementation="eager",
        ),
    ),
    # Gemma 3 with its real layer pattern, 5 sliding-window layers then 1 global layer, each kind with
    # its own RoPE (local theta 1e4; global theta 1e6, linear factor 8 as in the 4B-27B models). The
    # window (3) is smaller than the groups at the tests' lengths, so it matters inside them.
    "gemma3-interleaved": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=3,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    # Cohere (Command R+): per-head LayerNorm on q and k, interleaved RoPE, scaled logits, tied embeddings.
    "cohere": (
        "CohereConfig",
        "CohereForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            use_qk_norm=True,
            logit_scale=0.0625,
            rope_parameters={"rope_type": "default", "rope_theta": 75000000.0},
        ),
    ),
    # DeepSeek-V3: multi-head latent attention, whose value head size (v_head_dim) differs from the
    # query/key head size (qk_nope_head_dim + qk_rope_head_dim): 8 vs 12 here, 128 vs 192 in the
    # checkpoint; low-rank q and kv; YaRN RoPE whose mscale changes the attention scaling; a dense
    # first layer, then MoE with grouped top-k routing and a shared expert.
    "deepseek-v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            moe_intermediate_size=16,
            first_k_dense_replace=1,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "rope_theta": 10000.0,
            },
            experts_implementation="eager",
        ),
    ),
}


def tiny_config(name: str, **overrides) -> transformers.PreTrainedConfig:
    config_cls, _, extra = ARCHITECTURES[name]
    kwargs = {**COMMON, **extra, **overrides}
    if kwargs.get("layer_types", 0) is None:
        kwargs.pop("layer_types")
    return getattr(transformers, config_cls)(**kwargs)


def tiny_model(name: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny randomly initialised causal LM of architecture `name`, float32, in eval mode."""
    torch.manual_seed(seed)
    _, model_cls, _ = ARCHITECTURES[name]
    model = getattr(transformers, model_cls)(tiny_config(name, **overrides))
    return model.eval()


def trained(model):
    """Move every trainable weight away from its initial value, as training would (in place; returns the model)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def shadow_longlora_hf(tmp_path) -> str:
    """A PYTHONPATH entry under which `import longlora_hf` fails, as on a machine without the package."""
    shadow = tmp_path / "shadow" / "longlora_hf"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('longlora_hf is not installed here')\n")
    return str(shadow.parent)
