"""`longlora-hf merge` and `longlora-hf convert-reference`: the commands' parsers and run functions."""

from __future__ import annotations

from ..flags import add_flag


def register(subparsers) -> None:
    merge = subparsers.add_parser(
        "merge", help="Merge a LongLoRA or LoRA adapter into its base: a plain transformers model."
    )
    merge.add_argument("--base", required=True, help="Base model path or id.")
    merge.add_argument("--adapter", required=True, help="Adapter path or id.")
    merge.add_argument("--out", required=True, help="Directory for the merged model (safetensors).")
    add_flag(
        merge,
        "--push_to_hub",
        metavar="REPO",
        help="Also upload the merged model to this Hub repo (token: HF_TOKEN or `hf auth login`).",
    )
    merge.add_argument("--private", action="store_true", help="Create the --push_to_hub repo as private.")
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace what merge writes in an --out that holds files it did not write (the others are kept).",
    )
    merge.set_defaults(run=run_merge)
    convert = subparsers.add_parser(
        "convert-reference",
        help="A reference-layout checkpoint (adapter + trainable_params.bin) -> a LongLoRA adapter.",
    )
    convert.add_argument("--checkpoint", required=True, help="The reference checkpoint directory.")
    convert.add_argument("--out", required=True, help="Directory for the LongLoRA adapter.")
    add_flag(
        convert,
        "--target_context_length",
        type=int,
        help="The context the checkpoint was trained for (restores its RoPE scaling).",
    )
    convert.add_argument(
        "--base",
        help="The base model (path or id; only its config is read): check every tensor's name and shape against it.",
    )
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help=(
            "Replace what convert-reference writes in an --out that holds files it did not write "
            "(the others are kept)."
        ),
    )
    convert.set_defaults(run=run_convert)


def run_merge(args) -> int:
    """A failed push (`HubError`) or a full disk (`OutOfSpaceError`) is an OSError of one line: `main` prints it
    and exits with 2."""
    from .merge import merge_adapter

    out = merge_adapter(
        args.base, args.adapter, args.out, push_to_hub=args.push_to_hub, private=args.private, overwrite=args.overwrite
    )
    print(f"merged model written to {out}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def run_convert(args) -> int:
    from .convert import convert_reference_checkpoint

    out = convert_reference_checkpoint(
        args.checkpoint, args.out, args.target_context_length, base=args.base, overwrite=args.overwrite
    )
    print(f"LongLoRA adapter written to {out}")
    return 0
