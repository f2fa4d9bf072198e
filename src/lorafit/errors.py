"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input, config or environment: the message says what is wrong and how to fix it."""
