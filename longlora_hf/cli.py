"""The `longlora-hf` command."""

from __future__ import annotations

import argparse
import sys

from .metrics.cli import add_eval_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longlora-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("example", help="A short end-to-end S2-Attn training example on a tiny model (CPU, ~1 min).")
    add_eval_command(sub)
    args = parser.parse_args(argv)
    if args.command == "example":
        from .example import run_example

        run_example()
        return 0
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"longlora-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
