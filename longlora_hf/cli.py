"""The `longlora-hf` command."""

from __future__ import annotations

import argparse
import sys

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
    add_eval_command(sub)
    args = parser.parse_args(argv)
    if args.command == "example":
        from .example import run_example

        run_example()
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


if __name__ == "__main__":
    sys.exit(main())
