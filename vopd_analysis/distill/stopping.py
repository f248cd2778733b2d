"""How a ``vopd distill`` run stops, in both engines: Ctrl-C (SIGINT) or SIGTERM asks to stop after the
current step (``StopOnSignal``, agreed by every process: ``stop_agreed``); the engine checkpoints that step,
prints one line saying how to resume (``interrupted_message``) and raises ``Interrupted``, whose status is
the exit status (130, 143 after SIGTERM). An immediate stop says what was left (``abandoned``), and a
launcher's process group is torn down before the interpreter exits (``end_process_group``).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint as ckpt


class Interrupted(KeyboardInterrupt):
    """Raised by ``run`` after a Ctrl-C or a SIGTERM, once the last completed step is checkpointed and
    the console told how to resume; ``status`` is the exit status (``main``): 130 after SIGINT, 143
    after SIGTERM (128 + the signal's number)."""

    def __init__(self, message: str = "", status: int = 128 + signal.SIGINT):
        super().__init__(message)
        self.status = status


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's stop) as a request to stop between steps, for the
    ``with`` block.

    The first signal sets ``requested`` and ``signum`` (the loop finishes its step, checkpoints and
    stops) and calls ``forward(signum)`` if given (``vopd sweep`` passes it to its workers); one more
    than ``grace`` seconds later raises ``KeyboardInterrupt`` at once (one within ``grace`` is the same
    Ctrl-C forwarded by a launcher such as torchrun). Installed only in the main thread; elsewhere
    the signals keep their default behaviour.

    Args:
      grace: seconds within which a second signal counts as the first one, forwarded.
      message: what the first signal prints, after "interrupt: " (or "SIGTERM: ").
      forward: called with the signal's number on the first signal.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace: float = 2.0, message: str = "finishing the current step, then saving a checkpoint",
                 forward=None):
        self.grace, self.message, self.forward = grace, message, forward
        self.requested_at, self.signum, self._previous = None, None, {}

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    @property
    def status(self) -> int:
        """The exit status a stop by this signal gets: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGINT)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        """The handler: note the first request, raise on a later one past ``grace``."""
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at, self.signum = now, signum
            what = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{what}: {self.message} (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            if self.forward is not None:
                self.forward(signum)
        elif now - self.requested_at > self.grace:
            raise KeyboardInterrupt


def stop_agreed(acc, stop: StopOnSignal) -> bool:
    """Whether any process was asked to stop (one all-reduce with several processes, so that all
    stop after the same step)."""
    flag = float(stop.requested)
    if acc.num_processes > 1:
        flag = float(acc.reduce(torch.tensor(flag, device=acc.device), "sum"))
    return flag > 0


def interrupted_message(out: Path, done: int, steps: int, where: str, num_processes: int,
                        signum: Optional[int] = None) -> str:
    """The one line a Ctrl-C (or another ``signum``, named) leaves: the step reached, ``where`` it was
    saved, how to resume."""
    how = f"vopd distill --out {out} --resume" + (
        f" (launched the same way, {num_processes} processes)" if num_processes > 1 else "")
    by = "" if signum in (None, signal.SIGINT) else f" by {signal.Signals(signum).name}"
    return f"interrupted{by} after step {done} of {steps}: {where}; continue with: {how}"


def abandoned(out_dir: Path) -> str:
    """What an immediate interrupt (a second Ctrl-C, or one during setup) left, and how to go on."""
    if not (out_dir / "config.json").is_file():
        return "the run had not started; nothing was written"
    latest = ckpt.latest(out_dir)
    return (f"stopped at once, nothing saved after {'checkpoint ' + latest.name if latest else 'the start'}; "
            f"continue with: vopd distill --out {out_dir} --resume")


def end_process_group(settle_s: float = 1.0) -> None:
    """Tear down the default process group, if a launcher started one, before the interpreter exits.

    A gloo worker thread frees each finished collective after the caller has already returned from
    waiting on it, and freeing one that holds Python tensors needs the GIL. If the interpreter is
    shutting down by then, the thread is killed inside a C++ destructor and the process aborts
    ("terminate called without an active exception", SIGABRT after a finished run); if the main
    thread is destroying the group, it joins that thread while holding the GIL and hangs. Sleeping
    ``settle_s`` releases the GIL so the workers finish and go idle; then the group is destroyed
    (local, no collective, so safe on error paths too)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        time.sleep(settle_s)
        torch.distributed.destroy_process_group()
