"""One exception type for every user-facing failure.

The CLI turns a :class:`DietpruneError` into a single line on stderr and exit code 2;
any other exception is a bug and keeps its traceback.
"""


class DietpruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class UnreachableSparsity(DietpruneError):
    """The method's structure cannot reach the requested sparsity on this model.

    `reachable` is the (lowest, highest) parameter sparsity the method can produce here, so a
    caller (a sweep, a study) can record the target as not possible rather than as a failure.
    """

    def __init__(self, message: str, method: str, sparsity: float, reachable: tuple[float, float]):
        super().__init__(message)
        self.method, self.sparsity, self.reachable = method, sparsity, reachable
