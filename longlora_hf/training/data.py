"""The data of `longlora-hf sft`: loaded by the rules of TRL's SFT script, formatted with `--record_format`, and the
local files it comes from, found as `datasets` finds them (so the checks before training read what will be read).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .arguments import SftArguments
from .formatting import record_fields
from .launch import is_main_process


logger = logging.getLogger(__name__)

# The files whose records the checks before training can read.
CHECKED_SUFFIXES = (".json", ".jsonl", ".txt")
# The `datasets` builders of those files: their `data_files` are local paths (relative to `data_dir` or the
# working directory), resolved here too.
LOCAL_FILE_BUILDERS = ("json", "text")


def is_local(value) -> bool:
    """Whether `value` (a model or data source) is a path that exists here, not a Hub id or a builder name."""
    return _local(value) is not None


def _local(value) -> Path | None:
    if not isinstance(value, (str, os.PathLike)):
        return None
    path = Path(value).expanduser()
    return path if path.exists() else None


def _sources(args: SftArguments) -> list[tuple[str, str | None, str | None, object]]:
    """(path, name, data_dir, data_files) of each dataset the run loads: each `datasets:` mixture entry, else
    `--dataset_name`."""
    if args.dataset.datasets:
        return [(entry.path, entry.name, entry.data_dir, entry.data_files) for entry in args.dataset.datasets]
    return [(args.script.dataset_name, args.script.dataset_config, None, None)]


def _patterns(data_files) -> list[str]:
    if isinstance(data_files, dict):
        return [p for group in data_files.values() for p in _patterns(group)]
    if isinstance(data_files, (str, os.PathLike)):
        return [str(data_files)]
    return [str(p) for p in data_files or []]


def local_data_paths(args: SftArguments) -> list[Path]:
    """The local files and directories the data comes from (what an output must stay out of): each source's
    `path` and `data_files` that exist here, each once."""
    found = []
    for path, _, _, files in _sources(args):
        found.append(_local(path))
        found.extend(_local(pattern) for pattern in _patterns(files))
    return [path for path in dict.fromkeys(found) if path is not None]


def local_data_files(args: SftArguments) -> list[Path]:
    """The local .json/.jsonl/.txt files `datasets.load_dataset` will read for the run, as `datasets` itself
    resolves them (`load_dataset_builder`: a directory's configs and split names, `data_files` globs, the
    module's file types; hidden and metadata files left out): for a local directory, and for the `json` and
    `text` builders over local `data_files`. A local file is itself; a Hub dataset and remote `data_files` (URLs)
    are left to `datasets`."""
    from datasets import load_dataset_builder

    resolved = []
    for path, name, data_dir, files in _sources(args):
        if any("://" in pattern for pattern in _patterns(files)):
            continue
        local = _local(path) if path not in LOCAL_FILE_BUILDERS else None  # a builder name wins, as in datasets
        if local is not None and local.is_file():
            resolved.append(str(local))
            continue
        if local is None and not (path in LOCAL_FILE_BUILDERS and files):
            continue
        builder = load_dataset_builder(str(local or path), name=name, data_dir=data_dir, data_files=files)
        for split_files in (builder.config.data_files or {}).values():
            resolved.extend(str(file) for file in split_files)
    files = [Path(name) for name in dict.fromkeys(resolved)]
    return [file for file in files if file.suffix in CHECKED_SUFFIXES and file.is_file()]


def load_dataset(args: SftArguments):
    """The dataset, loaded by the rules of TRL's SFT script: a `datasets:` mixture wins over `dataset_name`."""
    from datasets import load_dataset as load_named_dataset
    from trl import get_dataset

    if args.dataset.datasets:
        if args.script.dataset_name and is_main_process():
            logger.warning(
                "Both `datasets` and `dataset_name` are provided. The `datasets` argument will be used to load the "
                "dataset and `dataset_name` will be ignored."
            )
        return get_dataset(args.dataset)
    if args.script.dataset_name:
        return load_named_dataset(
            args.script.dataset_name, name=args.script.dataset_config, streaming=args.script.dataset_streaming
        )
    raise ValueError("Either `datasets` or `dataset_name` must be provided.")


def format_dataset(dataset, args: SftArguments):
    """Each split of `dataset` as TRL prompt/completion rows in the `--record_format`, logging per split what was
    kept, truncated and dropped at `max_length`."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from .formatting import format_records

    style, too_long = args.longlora.record_format, args.longlora.too_long
    if not isinstance(dataset, DatasetDict):
        raise ValueError(f"--record_format needs a map-style dataset (not streaming); got {type(dataset).__name__}.")
    fields = record_fields(style, args.longlora.record_fields, "--record_fields")
    tokenizer = AutoTokenizer.from_pretrained(
        args.model.model_name_or_path,
        revision=args.model.model_revision,
        trust_remote_code=args.training.trust_remote_code,
    )
    max_length = args.training.max_length
    formatted = DatasetDict()
    for split, rows in dataset.items():
        examples, counts = format_records(rows.to_list(), style, tokenizer, max_length, too_long, fields)
        formatted[split] = Dataset.from_list(examples)
        if is_main_process():  # every rank formats; the main one says so
            logger.warning(
                f"LongLoRA {style} formatting of split {split!r}: {counts['kept']} kept, {counts['truncated']} "
                f"truncated, {counts['dropped']} dropped (max_length {max_length}, too_long={too_long!r})"
            )
    return formatted


def training_data(args: SftArguments):
    """The dataset as the trainer gets it: loaded as TRL's script loads it, then formatted with `--record_format`."""
    dataset = load_dataset(args)
    if args.longlora.record_format is not None:
        dataset = format_dataset(dataset, args)
    return dataset
