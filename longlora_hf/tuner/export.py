"""Plain LoRA and LongLoRA side by side: export a LongLoRA adapter as a plain LoRA adapter that vanilla PEFT loads
without `longlora_hf`, and load a plain LoRA adapter into a model that holds LongLoRA adapters."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from peft import LoraConfig, PeftConfig, PeftModel
from peft.utils import PeftType, load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .config import LongLoraConfig
from .model import tied_head_weights


LONGLORA_ONLY_FIELDS = {f.name for f in fields(LongLoraConfig)} - {f.name for f in fields(LoraConfig)}


def save_as_plain_lora(model: PeftModel, out_dir: str | Path, adapter_name: str = "default") -> Path:
    """Write `out_dir` as a plain LoRA adapter (peft_type LORA) with the base-config change beside it.

    - `adapter_config.json`: a LoraConfig; the embedding and norm weights are its `modules_to_save`;
    - `adapter_model.safetensors`: the same weights as the LongLoRA adapter, and, for an output head tied to the
      trained embedding, a copy of that embedding under the head's name (vanilla PEFT loads the head from it);
    - `config.json`: the base model's config with the position interpolation (rope_parameters,
      max_position_embeddings) and default attention. Load it without longlora_hf as
      `AutoModelForCausalLM.from_pretrained(base, config=AutoConfig.from_pretrained(out_dir))`, then
      `PeftModel.from_pretrained(base_model, out_dir)`.

    Args:
        model (`peft.PeftModel`):
            A model holding the LongLoRA adapter `adapter_name`.
        out_dir (`str` or `Path`):
            The directory to write; PEFT puts an adapter other than "default" in `out_dir/<adapter_name>`.
        adapter_name (`str`, defaults to "default"):
            The adapter to export.

    Returns:
        `Path`: the directory holding the plain LoRA adapter and its `config.json`.

    Raises:
        `TypeError`: when `adapter_name` is not a LongLoRA adapter.
    """
    out_dir = Path(out_dir)
    config = model.peft_config[adapter_name]
    if not isinstance(config, LongLoraConfig):
        raise TypeError(
            f"save_as_plain_lora needs a LongLoRA adapter; adapter {adapter_name!r} is a {type(config).__name__}."
        )
    model.save_pretrained(out_dir, selected_adapters=[adapter_name])
    adapter_dir = out_dir if adapter_name == "default" else out_dir / adapter_name
    tied = tied_head_weights(model, adapter_name)
    if tied:
        weights_path = adapter_dir / "adapter_model.safetensors"
        weights = load_file(weights_path)
        weights.update({name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tied.items()})
        save_file(weights, weights_path, metadata={"format": "pt"})
    config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    for key in LONGLORA_ONLY_FIELDS:
        adapter_config.pop(key, None)
    adapter_config["peft_type"] = "LORA"
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))

    base_config = model.get_base_model().config.to_dict()
    base_config.pop("s2_attention", None)
    base_config.pop("_attn_implementation_internal", None)
    (adapter_dir / "config.json").write_text(json.dumps(base_config, indent=2, sort_keys=True))
    return adapter_dir


def load_plain_lora(model: PeftModel, model_id: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
    """Load the plain LoRA adapter `model_id` (peft_type LORA: a `save_as_plain_lora` export, or anyone's LoRA) into
    `model`, a PeftModel holding LongLoRA adapters, as adapter `adapter_name`.

    PEFT keeps one peft type per model, so `model.load_adapter` refuses a LORA adapter next to LONGLORA ones ("Cannot
    combine adapters with different peft types"). A LoRA adapter is a LongLoRA adapter that changes neither the
    positions nor the attention and trains no LoRA+ modules beyond its own `modules_to_save`: it is loaded as one,
    with the same weights, so it computes what PEFT computes for it. Like `load_adapter`, it is not made active.
    A plain LoRA export carries its position interpolation in its `config.json`, not in the adapter: it runs at
    the positions the model has (those of its LongLoRA twin, when loaded next to it).

    Args:
        model (`peft.PeftModel`):
            A model holding LongLoRA adapters; the adapter is added to it.
        model_id (`str` or `Path`):
            A local directory or Hub id of a plain LoRA adapter.
        adapter_name (`str`):
            The name to load it under.
        is_trainable (`bool`, defaults to False):
            Load it for training; otherwise its weights are frozen (inference mode), as `load_adapter` does.

    Raises:
        `ValueError`: when `model_id` is not a LoRA adapter (peft_type other than LORA).
    """
    peft_type = PeftConfig._get_peft_type(str(model_id))
    if peft_type != PeftType.LORA:
        raise ValueError(
            f"{model_id}: load_plain_lora loads LoRA adapters; this one is {peft_type}. Use model.load_adapter."
        )
    lora = LoraConfig.from_pretrained(str(model_id))
    shared = {f.name: getattr(lora, f.name) for f in fields(LoraConfig) if f.init and f.name != "peft_type"}
    config = LongLoraConfig(
        **shared, use_s2_attn=False, trainable_embeddings=False, trainable_norms=False, target_context_length=None
    )
    config.inference_mode = not is_trainable
    model.add_adapter(adapter_name, config)
    set_peft_model_state_dict(model, load_peft_weights(str(model_id)), adapter_name=adapter_name)
    if not is_trainable:
        for name, parameter in model.named_parameters():
            if f".{adapter_name}." in name:
                parameter.requires_grad_(False)
