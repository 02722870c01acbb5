"""Errors in what the user asked for (flags, config values, workdirs).

main.py prints a `UserError` as one line and exits non-zero; any other exception is a bug and
keeps its traceback. It subclasses ValueError so callers that catch bad values still do.
"""


class UserError(ValueError):
    """A problem the user can fix from the message alone."""
