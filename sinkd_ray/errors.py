"""The one exception type the command-line entry points turn into a one-line message."""


class SinkdError(ValueError):
    """A problem with the user's input or environment, phrased as what to do about it.

    Entry points catch it and print ``error: <message>`` with exit code 2 instead of a traceback.
    Raise it only with a message that names the offending value and the fix.
    """
