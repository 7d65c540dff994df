"""Errors a user can fix: printed as one line, exit code 2, never a traceback."""


class UserError(Exception):
    """Bad input from a user (a flag, a file, a manifest). The message names what and where."""

    exit_code = 2
