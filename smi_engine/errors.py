"""The one exception type that carries a user-facing message, and the one way text is made safe for a terminal."""


class SmiError(Exception):
    """A problem the user can fix: the message names the problem and the fix, in one line.

    The CLI prints it without a traceback and exits 2; library callers can catch it.
    """


def plain(text: object) -> str:
    """Text from a run, a plugin or the user, safe for a terminal: every character that is not
    printable (ESC and the other controls, bidi overrides, newlines) is written as its escape,
    so no sequence reaches the terminal and nothing spans lines."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
