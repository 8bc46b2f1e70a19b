"""The one exception type for problems a user can fix: entry points print its message, not a traceback."""


class UsageError(RuntimeError):
    """Bad input (a missing dataset, checkpoint or weight file, an impossible option) and how to fix it."""
