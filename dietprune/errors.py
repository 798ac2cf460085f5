"""One exception type for every user-facing failure.

The CLI turns a :class:`DietpruneError` into a single line on stderr and exit code 2;
any other exception is a bug and keeps its traceback.
"""


class DietpruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""
