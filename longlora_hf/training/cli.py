"""`longlora-hf format`: LongQA / LongAlpaca records -> TRL prompt/completion JSONL."""

from __future__ import annotations

import json

from ..flags import add_flag
from ..paths import check_input_file, check_local_or_hub, check_output_file, output_file
from .formatting import RECORD_FORMATS, TOO_LONG_POLICIES, format_records, read_records


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "format", help="LongQA / LongAlpaca JSON(L) records -> prompt/completion JSONL for `sft`."
    )
    parser.add_argument("--style", required=True, choices=list(RECORD_FORMATS))
    parser.add_argument("--input", required=True, help="A .json list or .jsonl file of records.")
    parser.add_argument("--output", required=True, help="Where the prompt/completion JSONL goes.")
    parser.add_argument("--tokenizer", help="Tokenizer path or id, to fit records into --max_length.")
    add_flag(parser, "--max_length", type=int, help="The training length in tokens (needs --tokenizer).")
    add_flag(
        parser,
        "--too_long",
        default="truncate",
        choices=list(TOO_LONG_POLICIES),
        help="LongQA materials that do not fit.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    parser.set_defaults(run=run)


def run(args) -> int:
    """Checks every path and number before reading the records; writes --output through a temporary sibling,
    so an interrupted run leaves the earlier file or none."""
    tokenizer = None
    source = check_input_file(args.input, "--input")
    check_output_file(args.output, "--output", {"--input": source}, args.overwrite)
    if args.max_length is not None:
        if args.max_length < 1:
            raise ValueError(f"--max_length must be a positive number of tokens; got {args.max_length}.")
        if args.tokenizer is None:
            raise ValueError("--max_length needs --tokenizer to count tokens.")
        check_local_or_hub(args.tokenizer, "--tokenizer")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    examples, counts = format_records(read_records(source), args.style, tokenizer, args.max_length, args.too_long)
    with output_file(args.output, "--output", {"--input": source}, args.overwrite) as partial:
        with open(partial, "w", encoding="utf-8") as f:
            for example in examples:
                f.write(json.dumps(example, ensure_ascii=False) + "\n")
    fitted = (
        f"{counts['truncated']} truncated to fit {args.max_length} tokens, {counts['dropped']} dropped"
        if args.max_length is not None
        else "none checked for length (no --max_length)"
    )
    print(
        f"wrote {len(examples)} prompt/completion examples to {args.output}: {counts['kept']} kept as they were, "
        f"{fitted}"
    )
    return 0
