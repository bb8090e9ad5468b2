"""The one exception type that user surfaces turn into a one-line message instead of a traceback, and the
helper that reduces a library's error to that one line."""


class LmsliceError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type where it has none): one line for the user."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
