"""The `longlora-hf` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .metrics.cli import add_eval_command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sft"]:
        # every `trl sft` flag and YAML key, parsed by TRL's own parser
        from .sft import main as sft_main

        return sft_main(argv[1:])
    parser = argparse.ArgumentParser(prog="longlora-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("example", help="A short end-to-end S2-Attn training example on a tiny model (CPU, ~1 min).")
    demo = sub.add_parser("demo", help="Extend the bundled small Llama from 256 to 2048 tokens with LongLoRA on the CPU (~5 min).")
    demo.add_argument("--out", default="longlora_demo", help="Where the table (JSON, PNG) and the adapter go.")
    demo.add_argument("--steps", type=int, default=100, help="Fine-tuning steps (each one row of 2048 tokens).")
    demo.add_argument("--ablations", action="store_true", help="Also run small counterparts of the paper's Tables 1, 3 and 11.")
    sub.add_parser("sft", help="TRL's SFT script with LongLoRA: every `trl sft` flag plus the LongLoRA ones (see `longlora-hf sft --help`).")
    fmt = sub.add_parser("format", help="LongQA / LongAlpaca JSON(L) records -> prompt/completion JSONL for `sft`.")
    fmt.add_argument("--style", required=True, choices=["longqa", "longalpaca"])
    fmt.add_argument("--input", required=True, help="A .json list or .jsonl file of records.")
    fmt.add_argument("--output", required=True, help="Where the prompt/completion JSONL goes.")
    fmt.add_argument("--tokenizer", help="Tokenizer path or id, to fit records into --max-length.")
    fmt.add_argument("--max-length", type=int, help="The training length in tokens (needs --tokenizer).")
    fmt.add_argument("--too-long", default="truncate", choices=["truncate", "drop"], help="LongQA materials that do not fit.")
    merge = sub.add_parser("merge", help="Merge a LongLoRA or LoRA adapter into its base: a plain transformers model.")
    merge.add_argument("--base", required=True, help="Base model path or id.")
    merge.add_argument("--adapter", required=True, help="Adapter path or id.")
    merge.add_argument("--out", required=True, help="Directory for the merged model (safetensors).")
    merge.add_argument("--push-to-hub", metavar="REPO", help="Also upload the merged model to this Hub repo (token: HF_TOKEN or `hf auth login`).")
    merge.add_argument("--private", action="store_true", help="Create the --push-to-hub repo as private.")
    convert = sub.add_parser("convert-reference", help="A reference-layout checkpoint (adapter + trainable_params.bin) -> a LongLoRA adapter.")
    convert.add_argument("--checkpoint", required=True, help="The reference checkpoint directory.")
    convert.add_argument("--out", required=True, help="Directory for the LongLoRA adapter.")
    convert.add_argument("--target-context-length", type=int, help="The context the checkpoint was trained for (restores its RoPE scaling).")
    convert.add_argument("--base", help="The base model (path or id; only its config is read): check every tensor's name and shape against it.")
    add_eval_command(sub)
    args = parser.parse_args(argv)
    if args.command == "example":
        from .example import run_example

        run_example()
        return 0
    if args.command == "format":
        try:
            return _format(args)
        except (ValueError, FileNotFoundError) as error:
            print(f"longlora-hf format: error: {error}", file=sys.stderr)
            return 2
    if args.command in ("merge", "convert-reference"):
        from huggingface_hub.errors import HfHubHTTPError

        from .hub import convert_reference_checkpoint, merge_adapter

        try:
            if args.command == "merge":
                out = merge_adapter(args.base, args.adapter, args.out, push_to_hub=args.push_to_hub, private=args.private)
                print(f"merged model written to {out}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
            else:
                out = convert_reference_checkpoint(args.checkpoint, args.out, args.target_context_length, base=args.base)
                print(f"LongLoRA adapter written to {out}")
        except (ValueError, FileNotFoundError) as error:
            print(f"longlora-hf {args.command}: error: {error}", file=sys.stderr)
            return 2
        except HfHubHTTPError as error:
            kept = f"; the merged model is saved in {args.out}" if args.command == "merge" and Path(args.out).exists() else ""
            print(f"longlora-hf {args.command}: error: the Hub refused: {error}\nCheck the repo id and your token "
                  f"(`hf auth login`, or HF_TOKEN){kept}.", file=sys.stderr)
            return 2
        return 0
    if args.command == "demo":
        from .demo.run import run_demo

        run_demo(args.out, steps=args.steps, ablations=args.ablations)
        return 0
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"longlora-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


def _format(args) -> int:
    import json

    from .training import format_records, read_records

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
    print(
        f"wrote {len(examples)} prompt/completion examples to {args.output}: {counts['kept']} kept as they were, "
        f"{counts['truncated']} truncated to fit {args.max_length} tokens, {counts['dropped']} dropped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
