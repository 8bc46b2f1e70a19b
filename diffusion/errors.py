"""The one exception type for problems a user can fix, and how entry points report it: one line, not a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["UsageError", "reported"]


class UsageError(RuntimeError):
    """Bad input (a missing dataset, checkpoint or weight file, an impossible option) and how to fix it."""


@contextlib.contextmanager
def reported(*also: type[Exception]) -> Iterator[None]:
    """Run an entry point's body: a user's error ends the program with one line `error: ...` and exit code 1.

    User errors are UsageError, `also` (exception types a CLI documents as bad input) and Hydra's
    InstantiationException caused by the user's own config (an unknown key, a rejected value, a bad _target_).
    Anything else is a bug and keeps its traceback. HYDRA_FULL_ERROR=1 shows the traceback of user errors too.
    """
    try:
        yield
    except Exception as error:
        if not _is_user_error(error, also) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # A UsageError raised while Hydra built an object already says what to fix: without Hydra's wrapping.
        said = error.__cause__ if isinstance(error.__cause__, UsageError) else error
        message = " ".join(line.strip() for line in str(said).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def _is_user_error(error: Exception, also: tuple[type[Exception], ...]) -> bool:
    if isinstance(error, (UsageError, *also)):
        return True
    hydra_errors = sys.modules.get("hydra.errors")  # not imported: no Hydra object was built, so none failed
    if hydra_errors is None or not isinstance(error, hydra_errors.InstantiationException):
        return False
    # Hydra wraps whatever the target raised. A TypeError (unknown or missing keyword), a ValueError (a value the
    # constructor rejects) or an ImportError (a _target_ that does not exist) comes from the config; the rest is ours.
    return error.__cause__ is None or isinstance(error.__cause__, UsageError | TypeError | ValueError | ImportError)
