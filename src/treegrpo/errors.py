"""Errors a user can fix (config, data, paths, services): the CLI prints them as one line, exit 2."""


class UserError(Exception):
    """Base class for errors caused by user input rather than by a bug."""
