"""One exception type for everything a user can get wrong (bad file, bad argument).

The CLI prints these as a single ``error: ...`` line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class NoduleSynthError(Exception):
    """A user-facing error: the message names the file or argument and what is wrong with it."""
