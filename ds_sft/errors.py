"""The one exception type that reaches the user as a single line instead of a traceback.

Raise :class:`UserError` for anything the user can fix (a missing file, a contradictory flag, a
malformed row). The message says what is wrong and how to fix it, in one line. Command entry
points catch it and print ``ds-sft <command>: error: <message>``; anything else is a bug in
ds-sft and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, config or environment, reported as one line."""


def first_line(err: BaseException) -> str:
    """The first line of a third-party exception's message (or its type name), to quote in a UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
