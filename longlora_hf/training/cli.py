"""`longlora-hf format`: LongQA / LongAlpaca records -> TRL prompt/completion JSONL."""

from __future__ import annotations

import json

from .formatting import RECORD_FORMATS, TOO_LONG_POLICIES, format_records, read_records


def register(subparsers) -> None:
    parser = subparsers.add_parser("format", help="LongQA / LongAlpaca JSON(L) records -> prompt/completion JSONL for `sft`.")
    parser.add_argument("--style", required=True, choices=list(RECORD_FORMATS))
    parser.add_argument("--input", required=True, help="A .json list or .jsonl file of records.")
    parser.add_argument("--output", required=True, help="Where the prompt/completion JSONL goes.")
    parser.add_argument("--tokenizer", help="Tokenizer path or id, to fit records into --max-length.")
    parser.add_argument("--max-length", type=int, help="The training length in tokens (needs --tokenizer).")
    parser.add_argument("--too-long", default="truncate", choices=list(TOO_LONG_POLICIES), help="LongQA materials that do not fit.")
    parser.set_defaults(run=run)


def run(args) -> int:
    tokenizer = None
    if args.max_length is not None:
        if args.tokenizer is None:
            raise ValueError("--max-length needs --tokenizer to count tokens.")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    examples, counts = format_records(read_records(args.input), args.style, tokenizer, args.max_length, args.too_long)
    with open(args.output, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
    fitted = (
        f"{counts['truncated']} truncated to fit {args.max_length} tokens, {counts['dropped']} dropped"
        if args.max_length is not None
        else "none checked for length (no --max-length)"
    )
    print(f"wrote {len(examples)} prompt/completion examples to {args.output}: {counts['kept']} kept as they were, {fitted}")
    return 0
