"""The `longlora-hf` command: one registry of commands.

Each command lives with the code it runs: its module's `register(subparsers)` adds the command's parser
and sets `run`, a function of the parsed arguments returning the exit code. A command whose arguments
another parser reads (`sft`: TRL's parser, with `--config` YAML) sets `parses_its_own_arguments` and gets
everything after its name as `command_argv`. Bad input (ValueError; OSError: a missing, unreadable or
unwritable path, an existing output; a missing optional dependency) ends with one line naming the command
and exit code 2; a command that runs for long
(`sft`) sets `reports_its_own_errors` and does that only for what it checks before its work starts, so an
error during training keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import example, real_model, sft
from .demo import cli as demo_cli
from .hub import cli as hub_cli
from .metrics import cli as metrics_cli
from .training import cli as training_cli


COMMANDS = (example, demo_cli, sft, training_cli, hub_cli, real_model, metrics_cli)
"""The modules whose `register(subparsers)` adds `longlora-hf` commands, in the order `--help` lists them."""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longlora-hf", description="LongLoRA for the Hugging Face ecosystem.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "parses_its_own_arguments", False):
        args.command_argv = argv[argv.index(args.command) + 1 :]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "reports_its_own_errors", False):
        return args.run(args)
    try:
        return args.run(args)
    except (ValueError, OSError, ImportError) as error:
        print(f"longlora-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
