"""`longlora-hf merge` and `longlora-hf convert-reference`: the commands' parsers and run functions."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    merge = subparsers.add_parser("merge", help="Merge a LongLoRA or LoRA adapter into its base: a plain transformers model.")
    merge.add_argument("--base", required=True, help="Base model path or id.")
    merge.add_argument("--adapter", required=True, help="Adapter path or id.")
    merge.add_argument("--out", required=True, help="Directory for the merged model (safetensors).")
    merge.add_argument("--push-to-hub", metavar="REPO", help="Also upload the merged model to this Hub repo (token: HF_TOKEN or `hf auth login`).")
    merge.add_argument("--private", action="store_true", help="Create the --push-to-hub repo as private.")
    merge.add_argument("--overwrite", action="store_true", help="Replace what merge writes in an --out that holds files it did not write (the others are kept).")
    merge.set_defaults(run=run_merge)
    convert = subparsers.add_parser("convert-reference", help="A reference-layout checkpoint (adapter + trainable_params.bin) -> a LongLoRA adapter.")
    convert.add_argument("--checkpoint", required=True, help="The reference checkpoint directory.")
    convert.add_argument("--out", required=True, help="Directory for the LongLoRA adapter.")
    convert.add_argument("--target-context-length", type=int, help="The context the checkpoint was trained for (restores its RoPE scaling).")
    convert.add_argument("--base", help="The base model (path or id; only its config is read): check every tensor's name and shape against it.")
    convert.add_argument("--overwrite", action="store_true", help="Replace what convert-reference writes in an --out that holds files it did not write (the others are kept).")
    convert.set_defaults(run=run_convert)


def run_merge(args) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from .merge import merge_adapter

    try:
        out = merge_adapter(args.base, args.adapter, args.out, push_to_hub=args.push_to_hub, private=args.private, overwrite=args.overwrite)
    except HfHubHTTPError as error:
        kept = f"; the merged model is saved in {args.out}" if Path(args.out).exists() else ""
        print(f"longlora-hf merge: error: the Hub refused: {error}\nCheck the repo id and your token "
              f"(`hf auth login`, or HF_TOKEN){kept}.", file=sys.stderr)
        return 2
    print(f"merged model written to {out}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def run_convert(args) -> int:
    from .convert import convert_reference_checkpoint

    out = convert_reference_checkpoint(args.checkpoint, args.out, args.target_context_length, base=args.base, overwrite=args.overwrite)
    print(f"LongLoRA adapter written to {out}")
    return 0
