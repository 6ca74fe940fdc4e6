"""`longlora-hf convert-reference`: a checkpoint in the reference repository's layout -> a LongLoRA adapter.

The reference layout is a PEFT LoRA adapter directory plus `trainable_params.bin`, a pickled state dict
of the embedding and normalization weights, which the reference code loads into the base model before
the adapter. Here both become one LongLoRA adapter: LoRA as is, embeddings and norms as
`modules_to_save` under today's transformers names, the target context recorded so loading restores the
position interpolation. The base model's config decides the names, the shapes, the tied weights and what
each tensor is (embedding or norm: by the module of the base it belongs to, as LoRA+ decides, not by name).
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..paths import check_model_source, check_output_directory, check_safetensors, output_directory
from ..tuner import ADAPTER_PREFIX, LongLoraConfig, check_adapter_weights, is_input_embedding, is_normalization


PREFIX = ADAPTER_PREFIX

# Weights the reference code's transformers (4.34) named otherwise than today's, per base model type: old
# name prefix -> today's. GPT-NeoX's output head was `embed_out` (the reference trained it: its name contains
# "embed"); it is `lm_head` now (transformers renames it the same way when it loads an old checkpoint).
RENAMED_SINCE_REFERENCE = {"gpt_neox": {"embed_out.": "lm_head."}}


def _refusal(path: Path, error: Exception) -> str:
    """Why `path` was not loaded, in one line, and how to get a copy that loads. torch's own message is not
    quoted: it suggests loading the file with `weights_only=False`, which runs whatever code the file holds."""
    text = str(error)
    if "Weights only load failed" not in text:
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
        return f"{path} cannot be read as a PyTorch checkpoint ({first}); it may be damaged: fetch or save it again."
    called = re.search(r"GLOBAL ([\w.]+)", text)
    what = f"unpickling it would call {called.group(1)}" if called else "it holds objects other than plain tensors"
    return (
        f"{path} holds code, not only tensors ({what}), so it was not loaded: loading it could run that code. Ask "
        "its author for a tensors-only copy, or, if you trust its source, load it in an isolated environment and "
        f"re-save only its tensors (torch.save({{name: tensor, ...}}, '{path.name}'), or safetensors.torch.save_file "
        "for an adapter), then convert that copy."
    )


def _load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive); refusing to load it.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise ValueError(_refusal(path, error)) from None  # not torch's message, not even in a traceback
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} is not a state dict of named tensors.")
    return state


def _load_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    if (adapter_dir / "adapter_model.safetensors").is_file():
        check_safetensors(adapter_dir / "adapter_model.safetensors", "--checkpoint")
        return load_file(adapter_dir / "adapter_model.safetensors")
    if (adapter_dir / "adapter_model.bin").is_file():
        return _load_pickle_state_dict(adapter_dir / "adapter_model.bin")
    raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors or adapter_model.bin.")


def _check_lora_rank(weights: dict[str, torch.Tensor], rank: int) -> None:
    """Refuse LoRA factors of another rank than the adapter config's."""
    for name, tensor in weights.items():
        if ".lora_A." in name and (tensor.dim() != 2 or tensor.shape[0] != rank):
            raise ValueError(
                f"adapter weight {name} has shape {tuple(tensor.shape)}; lora_A of rank r={rank} "
                "(adapter_config.json) is (r, in_features)."
            )
        if ".lora_B." in name and (tensor.dim() != 2 or tensor.shape[1] != rank):
            raise ValueError(
                f"adapter weight {name} has shape {tuple(tensor.shape)}; lora_B of rank r={rank} "
                "(adapter_config.json) is (out_features, r)."
            )


def _base_skeleton(base: str | None, recorded: str | None, config_path: Path) -> tuple[nn.Module, str]:
    """The base model built from its config on the meta device (no weights are read or allocated), and
    how to name it in messages. `base` (--base) wins over `recorded` (the adapter's base_model_name_or_path)."""
    source = base or recorded
    if not source:
        raise ValueError(
            f"{config_path} records no base_model_name_or_path, and the base model's config is needed to map "
            "the checkpoint's names to today's, check every tensor against them and find the weights the base "
            "ties to the input embedding. Pass --base with the base model's path or id (only its config is read)."
        )
    try:
        config = AutoConfig.from_pretrained(source)
        with torch.device("meta"):  # on the meta device transformers still ties the weights the config ties
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as error:
        if base:
            raise ValueError(f"cannot read the config of the base model --base {base}: {error}") from error
        raise ValueError(
            f"{config_path} records the base model as {recorded!r}, whose config cannot be read here ({error}). "
            "The base's config is needed to map the checkpoint's names to today's, check every tensor against "
            "them and find the weights the base ties to the input embedding: pass --base with the base model's "
            "path or id (only its config is read)."
        ) from error
    return model, source


def _todays_name(name: str, model_type: str, parameters: dict[str, nn.Parameter]) -> str | None:
    """`name` (without PREFIX) as the base names that weight today, or None when it names none of its weights."""
    if name in parameters:
        return name
    for old, new in RENAMED_SINCE_REFERENCE.get(model_type, {}).items():
        if name.startswith(old) and new + name[len(old) :] in parameters:
            return new + name[len(old) :]
    return None


def _check_lora_against_base(weights: dict[str, torch.Tensor], model: nn.Module, where: str) -> None:
    """Every adapter tensor is a LoRA factor (lora_A/lora_B) of a module of the base, of that module's width."""
    for name in weights:
        factor, rest = name.removeprefix(PREFIX).rpartition(".")[0].rpartition(".lora_")[1:]
        if not factor or rest not in ("A", "B"):
            raise ValueError(
                f"adapter weight {name} is not a LoRA factor (<module>.lora_A/lora_B.weight): the converter carries "
                "only those (embeddings and norms come from trainable_params.bin) and would drop it. Is this a "
                "reference LongLoRA checkpoint?"
            )
    check_adapter_weights({name: tuple(tensor.shape) for name, tensor in weights.items()}, model, where)


def _trained_kind(model: nn.Module, key: str) -> str | None:
    """What the base's weight `key` belongs to, as LoRA+ decides it (by module): "embeddings" (the input
    embedding), "norms" (a normalization layer), "output head" (kept: the reference trained GPT-NeoX's,
    named `embed_out`), or None for anything else."""
    module = model.get_submodule(key.rpartition(".")[0])
    if is_input_embedding(model, module):
        return "embeddings"
    if is_normalization(module):
        return "norms"
    if module is model.get_output_embeddings():
        return "output head"
    return None


def _map_to_base(
    trainable: dict[str, torch.Tensor], model: nn.Module, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set[str]]:
    """Rename `trainable` to the base's names of today, refusing any tensor that names none of its weights,
    belongs to a module the reference does not train, or has another shape. Returns the tensors under their
    names; separately, the copies a weight the base ties to a trained one (an output head tied to the input
    embedding) needs under its own name (PEFT keeps the tie and loads the tied module from that name); and
    the kinds of module found (see `_trained_kind`)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    tied: dict[int, list[str]] = {}  # a parameter -> its names (the tied ones have several)
    for name, parameter in parameters.items():
        tied.setdefault(id(parameter), []).append(name)
    aliases = {name: names for names in tied.values() for name in names}
    renamed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    kinds: set[str] = set()
    for name, tensor in trainable.items():
        key = _todays_name(name.removeprefix(PREFIX), model.config.model_type, parameters)
        if key is None:
            raise ValueError(
                f"trainable_params.bin: {name} is not a weight of {where}, under today's names or the reference's "
                "transformers 4.x ones; is this checkpoint for another model? Pass --base with the model it was "
                "trained from."
            )
        kind = _trained_kind(model, key)
        if kind == "output head" and key == name.removeprefix(PREFIX):
            # The reference trains an output head only where its transformers named it like an embedding
            # (GPT-NeoX's `embed_out`, renamed since); an output head under today's name is not its.
            kind = None
        if kind is None:
            module = key.rpartition(".")[0]
            raise ValueError(
                f"trainable_params.bin: {name} is a weight of {module} ({type(model.get_submodule(module)).__name__}) "
                f"in {where}, neither the input embedding nor a normalization layer: the reference trains only "
                "those (and GPT-NeoX's output head), so this is not a reference trainable_params.bin."
            )
        if tuple(tensor.shape) != tuple(parameters[key].shape):
            raise ValueError(
                f"trainable_params.bin: {name} has shape {tuple(tensor.shape)}; {where} has "
                f"{tuple(parameters[key].shape)}."
            )
        kinds.add(kind)
        canonical = aliases[key][0]
        if canonical in renamed:
            if not torch.equal(renamed[canonical], tensor):
                raise ValueError(
                    f"trainable_params.bin: {origin[canonical]} and {name} differ, but {where} ties them (one "
                    f"tensor: {', '.join(aliases[key])}); keep the one that was trained."
                )
            continue
        renamed[canonical], origin[canonical] = tensor, name
    # copies, not views: safetensors stores no shared memory, and PEFT ties the loaded modules again itself
    copies = {alias: renamed[canonical].clone() for canonical in renamed for alias in aliases[canonical][1:]}
    return renamed, copies, kinds


def convert_reference_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    target_context_length: int | None = None,
    base: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert `checkpoint` (reference layout) into a LongLoRA adapter in `out`.

    The base model's config (`base`, a path or id, else the `base_model_name_or_path` the checkpoint's
    adapter_config.json records; only the config is read) maps the names of the reference's transformers 4.x
    to today's (GPT-NeoX's `embed_out` is `lm_head`), checks every tensor's name and shape against the base,
    tells by the module each trainable tensor belongs to whether it is the input embedding or a norm (what
    LoRA+ trains; the reference chose by name, `embed` and `norm`), and says which weights the base ties to a
    trained one (an output head tied to the input embedding is
    written under its own name too, which PEFT needs to load it). A tensor that is no weight of the base is
    refused by name, never dropped. `out` is written by the rule of `longlora_hf.paths` (never into the
    checkpoint, files it did not write replaced only with `overwrite`, the earlier `out` or none after an
    interruption).

    Args:
        checkpoint (`str` or `Path`):
            The reference checkpoint's directory: `adapter_config.json`, the LoRA weights and
            `trainable_params.bin` (the embedding and norm weights).
        out (`str` or `Path`):
            The directory to write the LongLoRA adapter to.
        target_context_length (`int`, *optional*):
            The context the checkpoint was trained for, recorded in the adapter's `LongLoraConfig` so that loading
            it restores the position interpolation.
        base (`str`, *optional*):
            As above.
        overwrite (`bool`, defaults to False):
            Replace files in `out` that this command did not write.

    Returns:
        `Path`: `out`.

    Raises:
        `FileNotFoundError`: when the checkpoint, its `adapter_config.json` or its `trainable_params.bin` is
            missing.
        `ValueError`: when the checkpoint is not a reference LoRA checkpoint, `base` is refused, or a tensor does not
            fit the base.
        `FileExistsError`: when `out` holds files this command did not write and `overwrite` is False.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    config_path = checkpoint / "adapter_config.json"
    if checkpoint.exists() and not checkpoint.is_dir():
        raise ValueError(
            f"--checkpoint {checkpoint} is a file; give the checkpoint's directory (the one holding "
            "adapter_config.json)."
        )
    if not checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory.")
    if base is not None:
        check_model_source(base, "--base", "config")
    check_output_directory(out, "--out", {"--checkpoint": checkpoint, "--base": base}, overwrite)
    if not config_path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no adapter_config.json: not a reference LongLoRA checkpoint.")
    try:
        reference = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"--checkpoint: {config_path} is not valid JSON ({error}); restore it from the original."
        ) from error
    if not isinstance(reference, dict):
        raise ValueError(f"--checkpoint: {config_path} is not a JSON object; restore it from the original.")
    if reference.get("peft_type") != "LORA":
        raise ValueError(
            f"{config_path} has peft_type {reference.get('peft_type')!r}; the reference layout is a LORA adapter."
        )
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in reference]
    if missing:
        raise ValueError(
            f"--checkpoint: {config_path} has no {', '.join(missing)}: not a LoRA adapter config. Restore it from the "
            "original."
        )
    trainable_path = checkpoint / "trainable_params.bin"
    if not trainable_path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no trainable_params.bin (the embedding and norm weights).")
    trainable = _load_pickle_state_dict(trainable_path)
    weights = dict(_load_adapter_weights(checkpoint))
    _check_lora_rank(weights, reference["r"])
    recorded = reference.get("base_model_name_or_path")
    model, where = _base_skeleton(base, recorded, config_path)
    _check_lora_against_base(weights, model, where)
    renamed, tied_copies, kinds = _map_to_base(trainable, model, where)
    for name, tensor in {**renamed, **tied_copies}.items():
        weights[PREFIX + name] = tensor.contiguous()
    leaves = sorted({name.rsplit(".", 2)[-2] for name in renamed})
    config = LongLoraConfig(
        r=reference["r"],
        lora_alpha=reference["lora_alpha"],
        lora_dropout=reference.get("lora_dropout", 0.0),
        target_modules=reference["target_modules"],
        modules_to_save=leaves,
        target_context_length=target_context_length,
        base_model_name_or_path=base or recorded,
        trainable_embeddings="embeddings" in kinds,
        trainable_norms="norms" in kinds,
        ensure_weight_tying=bool(tied_copies),
    )
    with output_directory(out, "--out", {"--checkpoint": checkpoint, "--base": base}, overwrite) as partial:
        config.save_pretrained(partial)
        save_file(weights, partial / "adapter_model.safetensors", metadata={"format": "pt"})
    return out
