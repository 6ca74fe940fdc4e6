"""`longlora-hf convert-reference`: a checkpoint in the reference repository's layout -> a LongLoRA adapter.

The reference layout is a PEFT LoRA adapter directory plus `trainable_params.bin`, a pickled state dict
of the embedding and normalization weights, which the reference code loads into the base model before
the adapter. Here both become one LongLoRA adapter: LoRA as is, embeddings and norms as
`modules_to_save`, the target context recorded so loading restores the position interpolation.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..tuner import LongLoraConfig

PREFIX = "base_model.model."


def _load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive); refusing to load it.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise ValueError(f"{path} holds more than tensors (weights_only loading refused it): {error}") from error
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path} is not a state dict of named tensors.")
    return state


def _load_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    if (adapter_dir / "adapter_model.safetensors").is_file():
        return load_file(adapter_dir / "adapter_model.safetensors")
    if (adapter_dir / "adapter_model.bin").is_file():
        return _load_pickle_state_dict(adapter_dir / "adapter_model.bin")
    raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors or adapter_model.bin.")


def _check_shapes(weights: dict[str, torch.Tensor], trainable: dict[str, torch.Tensor], rank: int, base: str | None) -> None:
    """Refuse tensors whose shapes cannot be what they claim: LoRA factors of another rank, embeddings that
    are not matrices, norms that are not vectors of the embedding width; with `base`, any tensor whose
    name or shape is not the base model's."""
    for name, tensor in weights.items():
        if ".lora_A." in name and (tensor.dim() != 2 or tensor.shape[0] != rank):
            raise ValueError(f"adapter weight {name} has shape {tuple(tensor.shape)}; lora_A of rank r={rank} (adapter_config.json) is (r, in_features).")
        if ".lora_B." in name and (tensor.dim() != 2 or tensor.shape[1] != rank):
            raise ValueError(f"adapter weight {name} has shape {tuple(tensor.shape)}; lora_B of rank r={rank} (adapter_config.json) is (out_features, r).")
    embeddings = {k: v for k, v in trainable.items() if "embed" in k}
    for name, tensor in embeddings.items():
        if tensor.dim() != 2:
            raise ValueError(f"trainable_params.bin: {name} has shape {tuple(tensor.shape)}; an embedding is a (vocab, hidden) matrix.")
    widths = {v.shape[1] for v in embeddings.values()}
    for name, tensor in trainable.items():
        if "embed" not in name and (tensor.dim() != 1 or (widths and tensor.shape[0] not in widths)):
            raise ValueError(
                f"trainable_params.bin: {name} has shape {tuple(tensor.shape)}; a norm weight is a vector of the hidden size "
                f"{sorted(widths) or '(unknown)'}."
            )
    if base is None:
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    for name, tensor in trainable.items():
        key = name.removeprefix(PREFIX)
        if key not in expected:
            raise ValueError(f"trainable_params.bin: {name} is not a weight of {base}; is this checkpoint for another model?")
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(f"trainable_params.bin: {name} has shape {tuple(tensor.shape)}; {base} has {expected[key]}.")


def convert_reference_checkpoint(
    checkpoint: str | Path, out: str | Path, target_context_length: int | None = None, base: str | None = None
) -> Path:
    """Convert `checkpoint` (reference layout) into a LongLoRA adapter in `out`. With `base` (a model path or
    id; only its config is read), every embedding and norm tensor is checked against the base's names and
    shapes too."""
    checkpoint, out = Path(checkpoint), Path(out)
    config_path = checkpoint / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no adapter_config.json: not a reference LongLoRA checkpoint.")
    reference = json.loads(config_path.read_text())
    if reference.get("peft_type") != "LORA":
        raise ValueError(f"{config_path} has peft_type {reference.get('peft_type')!r}; the reference layout is a LORA adapter.")
    trainable_path = checkpoint / "trainable_params.bin"
    if not trainable_path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no trainable_params.bin (the embedding and norm weights).")
    trainable = _load_pickle_state_dict(trainable_path)
    unexpected = sorted(k for k in trainable if "embed" not in k and "norm" not in k)
    if unexpected:
        raise ValueError(
            f"{trainable_path} holds weights that are neither embeddings nor norms: {unexpected[:5]}. "
            "It is not a reference trainable_params.bin."
        )
    weights = dict(_load_adapter_weights(checkpoint))
    _check_shapes(weights, trainable, reference["r"], base)
    for name, tensor in trainable.items():
        weights[name if name.startswith(PREFIX) else PREFIX + name] = tensor.contiguous()
    leaves = sorted({name.removeprefix(PREFIX).rsplit(".", 2)[-2] for name in trainable})
    config = LongLoraConfig(
        r=reference["r"],
        lora_alpha=reference["lora_alpha"],
        lora_dropout=reference.get("lora_dropout", 0.0),
        target_modules=reference["target_modules"],
        modules_to_save=leaves,
        target_context_length=target_context_length,
        base_model_name_or_path=reference.get("base_model_name_or_path"),
        trainable_embeddings=any("embed" in leaf for leaf in leaves),
        trainable_norms=any("norm" in leaf for leaf in leaves),
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out
