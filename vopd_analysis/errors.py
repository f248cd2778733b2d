"""The one error type for bad user input, and how entry points report it."""

import sys


class InputError(ValueError):
    """Bad user input, reported with a message that names the problem."""


def exit_with(main) -> None:
    """``sys.exit(main())`` for a ``python -m`` entry point: an ``InputError`` becomes one line
    ``error: ...`` on stderr and exit status 2, not a traceback."""
    try:
        sys.exit(main())
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
