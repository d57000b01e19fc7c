"""The one exception a user sees: a one-line message naming the file or key and what to do.

Everything the user can fix (bad corpus, config typo, incompatible resume, full disk) raises
LmopsError; the CLI prints its message and exits 1. Anything else is a bug and keeps its traceback.
"""


class LmopsError(Exception):
    pass


class Interrupted(LmopsError):
    """Ctrl-C stopped training after it saved a checkpoint; the caller says how to continue."""
