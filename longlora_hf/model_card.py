"""Model cards for LongLoRA adapters and merged models, rendered from the template in `model_cards/`.

`render_model_card` fills the template; `write_model_card` puts it in a save directory. Adapters get
their card without anyone asking: `LongLoraConfig.save_pretrained` (called by every
`PeftModel.save_pretrained`, so by `trainer.save_model` and checkpoints) replaces the generic card PEFT
writes, and `LongLoraSFTTrainer.create_model_card` (what `trainer.push_to_hub()` calls) adds what the
trainer knows: data, steps and evaluation. `peft_model.push_to_hub` writes transformers' card over it
(README, "Known limits"); `longlora_hf.hub.push_adapter_to_hub` publishes this one.

A leaf: it imports only `position_interpolation`, the templates and third-party libraries, so the tuner,
the trainer and the Hub code all import it and none of them imports another for it.
"""

from __future__ import annotations

import math
import re
from importlib.resources import files
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from . import model_cards
from .position_interpolation import describe_rope


TEMPLATE = "longlora_adapter.md"
NOT_RECORDED = "not recorded"
# PEFT writes huggingface_hub's default card when a directory has none; its first heading tells it apart
# from a card someone wrote, which is left alone.
GENERIC_CARD_HEADING = "# Model Card for Model ID"
# The first line of every card this module writes: a card that still has it is rewritten on the next save.
GENERATED_MARK = "<!-- Written by longlora_hf on each save; delete this line to keep your edits. -->"
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_repo_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id (`owner/name`) and is not a local directory, else None: only
    Hub ids belong in a card's `base_model` metadata."""
    if not name or not HUB_REPO_ID.match(name) or Path(name).exists():
        return None
    return name


def evaluation_section(evaluation: dict | str | None) -> str:
    """Markdown for the evaluation: a table from `{model: {context_length: perplexity}}`, text as given,
    or a line saying no evaluation was run."""
    if evaluation is None or evaluation == {}:
        return (
            "Not evaluated yet. Measure perplexity by context length and passkey retrieval with "
            "`longlora-hf eval --model BASE --adapter THIS_ADAPTER` and add the table here."
        )
    if isinstance(evaluation, str):
        return evaluation
    lengths = sorted({int(length) for row in evaluation.values() for length in row})
    lines = [
        "Perplexity by evaluation context length (dense attention):",
        "",
        "| model | " + " | ".join(f"{length} tokens" for length in lengths) + " |",
        "|" + "---|" * (len(lengths) + 1),
    ]
    for name, row in evaluation.items():
        row = {int(length): value for length, value in row.items()}
        cells = [f"{row[length]:.2f}" if length in row and math.isfinite(row[length]) else "-" for length in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loading_section(repo_or_path: str, merged: bool) -> str:
    if merged:
        return (
            "The adapter is merged into the weights and the position interpolation is in `config.json`: plain\n"
            "transformers loads it with its default (dense) attention, no `longlora_hf` needed.\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_or_path}")\n```'
        )
    return (
        "With `longlora_hf` installed (`import longlora_hf` registers the adapter type; the position\n"
        "interpolation is restored and attention is dense):\n\n"
        "```python\nimport longlora_hf\nfrom peft import AutoPeftModelForCausalLM\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_or_path}")\n```\n\n'
        "Without `longlora_hf`: merge it once where `longlora_hf` is installed\n"
        f"(`longlora-hf merge --base BASE --adapter {repo_or_path} --out merged`) and load the merged model with\n"
        "plain transformers, or export a plain LoRA adapter with `longlora_hf.save_as_plain_lora` and load the\n"
        "base model with the RoPE scaling above."
    )


def position_extension(config) -> str:
    """What the adapter does to the base model's RoPE, in words."""
    factor = config.position_interpolation_factor
    if config.target_context_length is None:
        return "none (the base model's positions are kept)"
    if factor is None:
        return NOT_RECORDED
    if factor == 1.0:
        return "none: the target is within the context the base model already handles"
    return f"x{factor:g} over the base model's own scheme, giving {describe_rope(config.rope_parameters)}"


def render_model_card(
    config,
    *,
    base_model: str | None = None,
    repo_or_path: str | None = None,
    training_data: str | None = None,
    training_steps: int | str | None = None,
    evaluation: dict | str | None = None,
    title: str | None = None,
    merged: bool = False,
    tags: list[str] | None = None,
) -> str:
    """The README of a LongLoRA adapter (or, with `merged=True`, of a model it was merged into), from
    `config` (a `LongLoraConfig`) and what is known about the training. Unknown facts say so; nothing
    about credentials goes in.

    Args:
        config (`LongLoraConfig`):
            The adapter's config: its LoRA, LoRA+, S2-Attn settings and recorded position extension.
        base_model (`str`, *optional*):
            The base model; defaults to `config.base_model_name_or_path`. Only a Hub id goes in the metadata.
        repo_or_path (`str`, *optional*):
            Where the card's loading example loads the model from.
        training_data (`str`, *optional*):
            What it was trained on.
        training_steps (`int` or `str`, *optional*):
            How long it was trained.
        evaluation (`dict` or `str`, *optional*):
            `{model: {context_length: perplexity}}`, shown as a table, or Markdown shown as given.
        title (`str`, *optional*):
            The card's heading; by default the base model and the target context length.
        merged (`bool`, defaults to False):
            Describe a model the adapter was merged into, loaded with plain transformers.
        tags (`list[str]`, *optional*):
            Hub tags besides "longlora", "peft", "lora" (and "merged").

    Returns:
        `str`: the card: YAML metadata, then Markdown.
    """
    base_model = base_model or config.base_model_name_or_path
    hub_base = hub_repo_id(base_model)
    metadata = ModelCardData(
        base_model=hub_base,
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        tags=sorted({"longlora", "peft", "lora", *(["merged"] if merged else []), *(tags or [])}),
    ).to_yaml()
    lora_plus = [
        part
        for part, on in (
            ("input embedding", config.trainable_embeddings),
            ("every normalization layer", config.trainable_norms),
        )
        if on
    ]
    modules = config.target_modules
    target_modules = ", ".join(sorted(modules)) if isinstance(modules, (set, list, tuple)) else str(modules)
    kind = "A model merged from a LongLoRA adapter" if merged else "A LongLoRA adapter"
    template = files(model_cards).joinpath(TEMPLATE).read_text()
    return template.format(
        metadata=metadata.strip(),
        generated_mark=GENERATED_MARK,
        title=title
        or f"{kind}: {base_model or 'base model'} extended to {config.target_context_length or NOT_RECORDED} tokens",
        summary=(
            f"{kind} (Chen et al., ICLR 2024) for {base_model or 'its base model'}: trained with shifted sparse\n"
            "attention (S2-Attn), LoRA on the attention projections, and trainable embeddings and normalization\n"
            "layers (LoRA+), at a context extended by position interpolation."
        ),
        base_model=f"`{base_model}`" if base_model else NOT_RECORDED,
        original_context_length=config.original_context_length or NOT_RECORDED,
        target_context_length=config.target_context_length or NOT_RECORDED,
        original_rope=describe_rope(config.original_rope_parameters)
        if config.original_rope_parameters
        else NOT_RECORDED,
        position_extension=position_extension(config),
        group_size_ratio=f"{config.group_size} tokens" if config.group_size else config.group_size_ratio,
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=target_modules,
        lora_plus=", ".join(lora_plus) or "no LoRA+ modules",
        training_data=training_data or NOT_RECORDED,
        training_steps=training_steps if training_steps not in (None, "") else NOT_RECORDED,
        evaluation=evaluation_section(evaluation),
        loading=loading_section(repo_or_path or "path/to/this/model", merged),
    )


def is_replaceable_card(path: Path) -> bool:
    """True when `path` is missing, holds the generic card PEFT writes, or holds a card this module wrote
    (its mark still there); False for a card someone wrote."""
    if not path.exists():
        return True
    text = ModelCard.load(path).text.lstrip()
    return text.startswith(GENERIC_CARD_HEADING) or GENERATED_MARK in text


def write_model_card(save_directory: str | Path, config, *, overwrite: bool = False, **facts) -> Path | None:
    """Write the LongLoRA card as `save_directory/README.md` unless a card someone wrote is already there
    (`overwrite=True` replaces it). Returns the path written, or None when a card was kept.

    Args:
        save_directory (`str` or `Path`):
            The adapter's (or merged model's) directory.
        config (`LongLoraConfig`):
            The adapter's config.
        overwrite (`bool`, defaults to False):
            Replace a card someone wrote too.
        **facts:
            The keyword arguments of `render_model_card` (training_data, evaluation, merged, ...).

    Returns:
        `Path` or `None`: `save_directory/README.md`, or None when a card someone wrote was kept.
    """
    path = Path(save_directory) / "README.md"
    if not overwrite and not is_replaceable_card(path):
        return None
    path.write_text(render_model_card(config, **facts), encoding="utf-8")
    return path
