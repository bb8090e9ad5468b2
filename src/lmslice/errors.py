"""The one exception type that user surfaces turn into a one-line message instead of a traceback."""


class LmsliceError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""
