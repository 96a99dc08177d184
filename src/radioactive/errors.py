"""The package's one exception type: an error the user can fix."""


class RadioactiveError(Exception):
    """Bad input or a failed precondition; the message says what to change.

    The command line prints the message on one line and exits with status 1
    (status 2 for usage errors caught by the argument parser).
    """
