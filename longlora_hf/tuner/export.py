"""Export a LongLoRA adapter as a plain LoRA adapter that vanilla PEFT loads without `longlora_hf`."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from peft import LoraConfig, PeftModel

from .config import LongLoraConfig

LONGLORA_ONLY_FIELDS = {f.name for f in fields(LongLoraConfig)} - {f.name for f in fields(LoraConfig)}


def save_as_plain_lora(model: PeftModel, out_dir: str | Path, adapter_name: str = "default") -> Path:
    """Write `out_dir` as a plain LoRA adapter (peft_type LORA) with the base-config change beside it.

    - `adapter_config.json`: a LoraConfig; the embedding and norm weights are its `modules_to_save`;
    - `adapter_model.safetensors`: the same weights as the LongLoRA adapter;
    - `config.json`: the base model's config with the position interpolation (rope_parameters,
      max_position_embeddings) and default attention. Load it without longlora_hf as
      `AutoModelForCausalLM.from_pretrained(base, config=AutoConfig.from_pretrained(out_dir))`, then
      `PeftModel.from_pretrained(base_model, out_dir)`.
    """
    out_dir = Path(out_dir)
    config = model.peft_config[adapter_name]
    if not isinstance(config, LongLoraConfig):
        raise TypeError(f"save_as_plain_lora needs a LongLoRA adapter; adapter {adapter_name!r} is a {type(config).__name__}.")
    model.save_pretrained(out_dir, selected_adapters=[adapter_name])
    adapter_dir = out_dir if adapter_name == "default" else out_dir / adapter_name
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
