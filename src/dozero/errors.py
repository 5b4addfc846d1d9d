"""The one exception type that the CLI turns into a one-line message and a non-zero exit.

Raise `DozeroError` for anything the *user* can fix (a missing file, a bad flag, a corrupt
checkpoint); its message says what went wrong, where, and what to do. Bugs stay ordinary
exceptions with tracebacks.
"""


class DozeroError(Exception):
    """A user-facing error: `dozero` prints `error: <message>` and exits with status 2."""
