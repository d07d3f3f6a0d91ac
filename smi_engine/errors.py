"""The one exception type that carries a user-facing message."""


class SmiError(Exception):
    """A problem the user can fix: the message names the problem and the fix, in one line.

    The CLI prints it without a traceback and exits 2; library callers can catch it.
    """
