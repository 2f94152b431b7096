"""The one exception type users see. The CLI prints its message on one line and exits with code 2."""


class MoleflowError(Exception):
    """A user-facing error: the message names the file or value at fault and what to do about it."""
