"""The one exception type for mistakes a user can fix (bad data, bad params, bad paths)."""


class UserError(Exception):
    """A problem in the user's input. Stages print its message alone and exit with status 2."""
