"""Shared fixtures: tiny models of every architecture we support, built from configs, and a tiny tokenizer.

Nothing is downloaded: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
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


def shadow_longlora_hf(tmp_path) -> str:
    """A PYTHONPATH entry under which `import longlora_hf` fails, as on a machine without the package."""
    shadow = tmp_path / "shadow" / "longlora_hf"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('longlora_hf is not installed here')\n")
    return str(shadow.parent)


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
