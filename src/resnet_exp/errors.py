"""Errors a user can fix: shown as one line, with a non-zero exit and no traceback."""


class UserError(ValueError):
    """A bad value or a missing input; the message names it and what is allowed."""
