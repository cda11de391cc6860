"""The one base class for problems a user can fix."""


class UserError(Exception):
    """A problem the user can fix: shown as one line naming the thing and the fix, never a traceback."""
