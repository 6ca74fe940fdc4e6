"""`longlora-hf demo`: the command's parser and run function (the demo itself is `run.run_demo`)."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="Extend the bundled small Llama from 256 to 2048 tokens with LongLoRA on the CPU."
    )
    parser.add_argument("--out", default="longlora_demo", help="Where the table (JSON, PNG) and the adapter go.")
    parser.add_argument("--steps", type=int, default=100, help="Fine-tuning steps (each one row of 2048 tokens).")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace what the demo writes in an --out that holds files it did not write (the others are kept).",
    )
    parser.add_argument(
        "--ablations", action="store_true", help="Also run small counterparts of the paper's Tables 1, 3 and 11."
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    from .run import run_demo

    run_demo(args.out, steps=args.steps, ablations=args.ablations, overwrite=args.overwrite)
    return 0
