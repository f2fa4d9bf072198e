"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""

__all__ = ["UserError"]

# Everything `str.splitlines` breaks a line at: a message quoting a file name, a column or a label
# that holds one of these must still print as one line.
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def _one_line(message: str) -> str:
    return "".join(repr(ch)[1:-1] if ch in _LINE_BREAKS else ch for ch in message)


class UserError(Exception):
    """Bad input, config or environment: the message says what is wrong and how to fix it.

    The message is always one line: line breaks inside it (from quoted user values) are escaped.
    """

    def __init__(self, message: str, *args: object):
        super().__init__(_one_line(str(message)), *args)
