"""Ctrl-C during `longlora-hf sft` training: stop at the end of the current step, not wherever Python is.

Python raises `KeyboardInterrupt` in whatever frame the main thread is running when SIGINT arrives. Raised inside a
finalizer (`__del__`, a weakref callback), it is printed as "Exception ignored" and lost, and training goes on: a
Ctrl-C that does nothing (the likely cause of a lost Ctrl-C once seen in CI). A run of `longlora-hf sft` therefore
takes SIGINT itself while it trains: the first one asks the Trainer to stop after the step it is in (a callback
sets `should_training_stop`), and the run then ends as an interrupted one (no final save, exit 130); a second one
raises `KeyboardInterrupt` at once. One process only: the ranks of a launch keep Python's handling, since they could
stop in different steps and wait for each other.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from transformers import TrainerCallback


class StopOnInterrupt(TrainerCallback):
    """Stops training at the end of the step in which SIGINT arrived (see `stop_on_interrupt`)."""

    def __init__(self):
        self.requested = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_training_stop = True
        return control


@contextlib.contextmanager
def stop_on_interrupt(callback: StopOnInterrupt, notice: bool = True) -> Iterator[StopOnInterrupt]:
    """While training, the first SIGINT sets `callback.requested` (and restores the previous handler, so a second
    one interrupts at once); outside the main thread nothing changes.

    Args:
        callback: The `StopOnInterrupt` the Trainer runs.
        notice: Print that the run will stop after the current step (the main process of a launch).
    """
    if threading.current_thread() is not threading.main_thread():
        yield callback
        return
    previous = signal.getsignal(signal.SIGINT)

    def handle(signum, frame):
        callback.requested = True
        signal.signal(signal.SIGINT, previous)
        if notice:
            print("LongLoRA: Ctrl-C: stopping after the current step (Ctrl-C again stops at once).", file=sys.stderr)

    signal.signal(signal.SIGINT, handle)
    try:
        yield callback
    finally:
        signal.signal(signal.SIGINT, previous)
