"""Errors a user can fix. The CLI prints these as one `error:` line instead of a traceback."""


class UserError(Exception):
    """A problem with what the user asked for (empty prompt, bad option value, ...)."""
