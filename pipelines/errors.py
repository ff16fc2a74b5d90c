"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class HotpathError(Exception):
    """A problem the user can fix (bad input, missing data, unreachable service)."""
