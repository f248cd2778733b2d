"""The one error type for bad user input, and how entry points report it."""

import sys


class InputError(ValueError):
    """Bad user input (shapes, values, files, options), with a message that names the problem.

    A ``ValueError``, so library callers can catch it as one; the entry points (``vopd``,
    ``python -m ...`` through ``exit_with``) turn it into one line ``error: ...`` and exit
    status 2; other exceptions keep their traceback.
    """


def exit_with(main) -> None:
    """Run a ``python -m`` entry point: ``sys.exit(main())``, with ``InputError`` reported in one line.

    Args:
      main: a callable taking no arguments and returning an exit status (int or None).

    Returns:
      Never: exits with ``main()``'s status, or prints ``error: <message>`` on stderr and
      exits with status 2 when ``main`` raises ``InputError``.
    """
    try:
        sys.exit(main())
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
