"""One exception type for user-facing problems (bad recipe, path, checkpoint).

The CLI prints its message as one line and exits with code 2; anything else is a bug and keeps its
traceback.
"""


class CompressError(Exception):
    """A problem with the user's input, explained in one line."""
