"""Supervised fine-tuning data: LongQA and LongAlpaca records as TRL prompt/completion examples.

TRL's SFTTrainer puts the loss on the completion only for prompt/completion data, so the answer is
the completion and the material and question are the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path


LONGQA_PROMPT = (
    "Below is {material_type}. Memorize the content and answer my question after the {material_type}. "
    "{material_content}\n Now the material ends. {question}"
)
"""The paper's LongQA prompt (Appendix)."""

LLAMA2_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information."
)
"""Llama-2's default system prompt, as the LongLoRA SFT code wraps LongAlpaca instructions in it."""


@dataclass
class LongQAFields:
    """Field names of LongQA records."""

    material_type: str = field(default="material_type", metadata={"help": "e.g. 'a book', 'a paper'."})
    material_content: str = field(default="material_content", metadata={"help": "The long material."})
    question: str = field(default="question", metadata={"help": "The question about the material."})
    answer: str = field(default="answer", metadata={"help": "The answer: the completion, where the loss goes."})


@dataclass
class LongAlpacaFields:
    """Field names of LongAlpaca records."""

    instruction: str = field(
        default="instruction", metadata={"help": "The instruction (LongAlpaca puts the material in it)."}
    )
    output: str = field(default="output", metadata={"help": "The response: the completion, where the loss goes."})
    input: str = field(default="input", metadata={"help": "Optional further input, appended to the instruction."})


RECORD_FORMATS = {"longqa": LongQAFields, "longalpaca": LongAlpacaFields}
"""The record formats and the dataclass naming each one's fields (its roles)."""
TOO_LONG_POLICIES = ("truncate", "drop")


def check_record_format(style: str, name: str = "style") -> None:
    """Raise unless `style` is a record format; `name` is how the caller's user spells the option."""
    if style not in RECORD_FORMATS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, RECORD_FORMATS))}; got {style!r}.")


def check_too_long(policy: str, name: str = "too_long") -> None:
    """Raise unless `policy` says what to do with a record longer than max_length."""
    if policy not in TOO_LONG_POLICIES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, TOO_LONG_POLICIES))}; got {policy!r}.")


def record_fields(style: str, spec: str | None, name: str = "fields"):
    """The field names of `style` records with the changes in `spec`, 'role=column,...' (the roles are the
    fields of the style's dataclass: `LongQAFields`, `LongAlpacaFields`)."""
    check_record_format(style)
    names = RECORD_FORMATS[style]()
    if not spec:
        return names
    roles = [f.name for f in dataclass_fields(names)]
    changes = {}
    for pair in spec.split(","):
        role, _, column = pair.partition("=")
        role, column = role.strip(), column.strip()
        if role not in roles or not column:
            raise ValueError(
                f"{name} {spec!r}: {pair!r} is not role=column with a role of {style} records ({', '.join(roles)})."
            )
        changes[role] = column
    return replace(names, **changes)


def _field(record: dict, name: str, index: int, style: str) -> str:
    if not isinstance(record, Mapping):  # a dict, or the row a `datasets` map passes
        raise ValueError(f"{style} record {index} is a {type(record).__name__}, not a JSON object.")
    if record.get(name) is None:  # missing, or null (a dataset with a column other records have fills it with None)
        present = sorted(key for key, value in record.items() if value is not None)
        raise ValueError(
            f"{style} record {index} has no field {name!r} (it has {present}). Fix the record, or name the "
            "field with the fields argument."
        )
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"{style} record {index}: field {name!r} must be a string; got {type(value).__name__}.")
    return value


def format_longqa(record: dict, fields: LongQAFields | None = None, index: int = 0) -> dict[str, str]:
    """{material_type, material_content, question, answer} -> {prompt, completion}, in the paper's LongQA prompt.

    Args:
        record: One LongQA record.
        fields: The record's field names, where they differ from the defaults.
        index: The record's number, for errors.

    Raises:
        ValueError: A field missing or not a string, named with the record.
    """
    fields = fields or LongQAFields()
    values = {
        key: _field(record, getattr(fields, key), index, "LongQA")
        for key in ("material_type", "material_content", "question")
    }
    return {"prompt": LONGQA_PROMPT.format(**values), "completion": _field(record, fields.answer, index, "LongQA")}


def format_longalpaca(
    record: dict,
    fields: LongAlpacaFields | None = None,
    index: int = 0,
    system_prompt: str = LLAMA2_SYSTEM_PROMPT,
) -> dict[str, str]:
    """{instruction, output[, input]} -> {prompt, completion} in Llama-2's [INST] chat format.

    Args:
        record: One LongAlpaca record.
        fields: The record's field names, where they differ from the defaults.
        index: The record's number, for errors.
        system_prompt: The system prompt inside `<<SYS>>` (LongAlpaca's training used Llama-2's).

    Raises:
        ValueError: A field missing or not a string, named with the record.
    """
    fields = fields or LongAlpacaFields()
    instruction = _field(record, fields.instruction, index, "LongAlpaca")
    extra = record.get(fields.input, "") if isinstance(record, Mapping) else ""
    if extra:
        instruction = f"{instruction} \n{extra}"
    prompt = f"[INST] <<SYS>>\n{system_prompt}\n<</SYS>> \n\n {instruction} [/INST]"
    return {"prompt": prompt, "completion": _field(record, fields.output, index, "LongAlpaca")}


def _json_lines(text: str, path: Path) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not valid JSON: {error.msg} (column {error.colno}).") from error
    return records


def read_records(path: str | Path) -> list:
    """Records from a .json file (a list, or JSON lines as `datasets` also reads them) or a .jsonl file.

    Args:
        path: The file.

    Returns:
        The records, as read.

    Raises:
        ValueError: A file that does not read as records, naming the file and the line.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 (byte {error.start} is {raw[error.start]:#x}); convert it to UTF-8."
        ) from error
    if path.suffix == ".jsonl":
        records = _json_lines(text, path)
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":
                raise ValueError(
                    f"{path} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})."
                ) from error
            records = _json_lines(text, path)  # one JSON value per line
        if not isinstance(records, list):
            raise ValueError(
                f"{path} must hold a JSON list of records (or one record per line); it holds a "
                f"{type(records).__name__}."
            )
    if not records:
        raise ValueError(f"{path} holds no records: the dataset is empty.")
    return records


def check_training_file(path: str | Path, text_field: str = "text") -> None:
    """A local data file as TRL's SFT trainer will need it, checked before training: .txt must be non-empty
    UTF-8; .json/.jsonl must read as records (`read_records`), each a JSON object with the columns TRL's SFT
    takes: a `text_field` string (language modeling), 'messages' (conversational), 'prompt' and 'completion',
    or 'input_ids' (already tokenized). Other formats (.csv, .parquet...) are left to `datasets`.

    Args:
        path: The data file.
        text_field: TRL's `dataset_text_field`.

    Raises:
        ValueError: A file or record TRL could not train on (or one with no content at all), naming it.
    """
    path = Path(path)
    if path.suffix == ".txt":
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path} is not UTF-8 (byte {error.start} is {raw[error.start]:#x}); convert it to UTF-8."
            ) from error
        if not raw.strip():
            raise ValueError(f"{path} is empty: the dataset has no text.")
        return
    if path.suffix not in (".json", ".jsonl"):
        return
    columns = f"a {text_field!r} string, 'messages', 'prompt' and 'completion', or 'input_ids'"
    with_content = 0
    for number, record in enumerate(read_records(path), 1):
        if not isinstance(record, dict):
            raise ValueError(
                f"{path} record {number} is a JSON {type(record).__name__}; TRL's SFT needs JSON objects with "
                f"{columns}."
            )
        if "messages" in record or "input_ids" in record or ("prompt" in record and "completion" in record):
            with_content += _has_content(record)
            continue
        if text_field in record:
            if not isinstance(record[text_field], str):
                raise ValueError(
                    f"{path} record {number}: {text_field!r} is a {type(record[text_field]).__name__}, not a string."
                )
            with_content += bool(record[text_field].strip())
            continue
        fields = ", ".join(sorted(record)[:8]) or "none"
        raise ValueError(
            f"{path} record {number} has fields {fields}; TRL's SFT needs {columns}. Rename the field, pass "
            "--dataset_text_field NAME for the field holding the text, or --record_format for LongQA/LongAlpaca "
            "records."
        )
    if not with_content:
        raise ValueError(
            f"{path}: every record is empty (blank {text_field!r}, messages, prompt and completion, or input_ids): "
            "training would learn only end-of-sequence tokens. Fill the records, or pass --dataset_text_field NAME "
            "for the field holding the text."
        )


def _has_content(record: dict) -> bool:
    """Whether a conversational, prompt-completion or tokenized record holds anything to train on."""

    def filled(value) -> bool:
        if isinstance(value, str):
            return bool(value.strip())
        if isinstance(value, dict):
            return filled(value.get("content"))
        if isinstance(value, list):
            return any(filled(item) if isinstance(item, (str, dict, list)) else item is not None for item in value)
        return value is not None

    return any(filled(record.get(key)) for key in ("messages", "input_ids", "prompt", "completion"))


def format_records(
    records: list[dict],
    style: str,
    tokenizer=None,
    max_length: int | None = None,
    too_long: str = "truncate",
    fields=None,
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Format every record (style "longqa" or "longalpaca"), checking each before training starts.

    With a tokenizer and `max_length`, a LongQA material that does not fit is truncated (the end of the
    material is cut; the prompt's frame, the question and the answer are kept) or the record dropped,
    as `too_long` says. LongAlpaca records that do not fit are dropped (cutting them would cut the
    answer).

    Args:
        records: The records.
        style: "longqa" or "longalpaca".
        tokenizer: The model's tokenizer, to measure lengths (None: nothing is measured).
        max_length: The training length in tokens (None: no limit).
        too_long: "truncate" or "drop", for a LongQA record longer than `max_length`.
        fields: The records' field names (`LongQAFields` or `LongAlpacaFields`), where they differ from the
            defaults.

    Returns:
        The TRL prompt/completion examples, and the counts kept, truncated and dropped.

    Raises:
        ValueError: An unknown style or policy, no records, or a bad record (named).
    """
    check_record_format(style)
    check_too_long(too_long)
    if not records:
        raise ValueError("The dataset is empty: no records to format.")
    record_fields = fields or RECORD_FORMATS[style]()
    format_one = format_longqa if style == "longqa" else format_longalpaca
    formatted, counts = [], {"kept": 0, "truncated": 0, "dropped": 0}
    for index, record in enumerate(records):
        example = format_one(record, record_fields, index)
        if tokenizer is not None and max_length is not None and _length(tokenizer, example) > max_length:
            if too_long == "truncate" and style == "longqa":
                example = _truncate_material(record, record_fields, index, tokenizer, max_length)
                counts["truncated"] += 1
            else:
                counts["dropped"] += 1
                continue
        else:
            counts["kept"] += 1
        formatted.append(example)
    if not formatted:
        raise ValueError(
            f"Every one of the {len(records)} records is longer than max_length={max_length} and was dropped."
        )
    return formatted, counts


def _length(tokenizer, example: dict[str, str]) -> int:
    return len(tokenizer(example["prompt"] + example["completion"], add_special_tokens=True)["input_ids"]) + 1  # + EOS


def _truncate_material(record, fields, index, tokenizer, max_length) -> dict[str, str]:
    """Cut the end of the material until prompt + answer fit in max_length tokens."""
    material_ids = tokenizer(record[fields.material_content], add_special_tokens=False)["input_ids"]
    shortened = dict(record)
    keep = len(material_ids)
    while True:
        keep -= max(1, _length(tokenizer, format_longqa(shortened, fields, index)) - max_length)
        if keep <= 0:
            raise ValueError(
                f"LongQA record {index}: the prompt and answer without the material are already longer than "
                f"max_length={max_length}; drop such records (too_long='drop') or raise max_length."
            )
        shortened[fields.material_content] = tokenizer.decode(material_ids[:keep])
        example = format_longqa(shortened, fields, index)
        if _length(tokenizer, example) <= max_length:
            return example
