"""The one error type for bad user input, and how entry points report it and a Ctrl-C."""

import contextlib
import os
import signal
import sys
import threading


class InputError(ValueError):
    """Bad user input (shapes, values, files, options), with a message that names the problem.

    A ``ValueError``, so library callers can catch it as one; the entry points (``vopd``,
    ``python -m ...`` through ``exit_with``) turn it into one line ``error: ...`` and exit
    status 2; other exceptions keep their traceback.
    """


@contextlib.contextmanager
def interrupt_exits_at_once():
    """Within the block (heavy imports: torch takes seconds), a Ctrl-C prints ``interrupted`` and ends
    the process at once with status 130 (``os._exit``). A ``KeyboardInterrupt`` raised inside an import
    is no answer: C code that imports numpy (torch's) can swallow it and leave a half-imported module
    that fails later with a long traceback. Nothing is written while importing, so there is nothing to
    clean up. Main thread only, and only where SIGINT has Python's default handler (an ignored SIGINT,
    as in a background job, stays ignored)."""
    install = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, _exit_at_once) if install else None
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGINT, previous)


def _exit_at_once(signum, frame):
    try:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)


_STARTUP = contextlib.ExitStack()     # interrupt_exits_at_once while a python -m module imports


def quiet_interrupt_while_starting() -> None:
    """For a ``python -m`` module, called before its heavy imports: ``interrupt_exits_at_once`` until
    ``exit_with`` runs ``main``."""
    _STARTUP.enter_context(interrupt_exits_at_once())


def exit_with(main) -> None:
    """Run a ``python -m`` entry point: ``sys.exit(main())``, with ``InputError`` reported in one line.

    Args:
      main: a callable taking no arguments and returning an exit status (int or None).

    Returns:
      Never: exits with ``main()``'s status; prints ``error: <message>`` on stderr and exits with
      status 2 when ``main`` raises ``InputError``; prints ``interrupted`` and exits with 130 (or the
      exception's ``status``, 143 after a SIGTERM) on a ``KeyboardInterrupt``.
    """
    _STARTUP.close()
    try:
        sys.exit(main())
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(getattr(err, "status", 130))
