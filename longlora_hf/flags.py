"""One spelling for the commands' flags: snake_case, as transformers' and TRL's (`--max_length`, `--push_to_hub`).

The kebab-case spellings of 0.1.0 (`--max-length`, `--push-to-hub`...) are still accepted in 0.2.x, with a
deprecation warning, and will be removed in 0.3.0.
"""

from __future__ import annotations

import argparse
import warnings


class _DeprecatedSpelling(argparse.Action):
    """Stores into the snake_case flag's destination, after a warning naming the spelling to use."""

    def __init__(self, option_strings, dest, spelling: str, store_true: bool = False, **kwargs):
        self.spelling, self.store_true = spelling, store_true
        super().__init__(option_strings, dest, nargs=0 if store_true else kwargs.pop("nargs", None), **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(
            f"{option_string} is deprecated and will be removed in longlora-hf 0.3.0: use {self.spelling}.",
            FutureWarning,
            stacklevel=2,
        )
        setattr(namespace, self.dest, True if self.store_true else values)


def add_flag(parser: argparse.ArgumentParser, flag: str, **kwargs) -> argparse.Action:
    """`parser.add_argument(flag, **kwargs)` for a snake_case `flag`, plus its kebab-case spelling of 0.1.0,
    accepted with a deprecation warning and hidden from the help."""
    action = parser.add_argument(flag, **kwargs)
    old = flag.replace("_", "-")
    if old != flag:
        store_true = kwargs.get("action") == "store_true"
        extra = {} if store_true else {k: kwargs[k] for k in ("type", "nargs", "choices", "metavar") if k in kwargs}
        parser.add_argument(
            old,
            dest=action.dest,
            action=_DeprecatedSpelling,
            spelling=flag,
            store_true=store_true,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
            **extra,
        )
    return action
