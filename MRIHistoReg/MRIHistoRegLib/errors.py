"""The two kinds of failure, kept apart so every front can say the right thing.

`UserInputError`: the input is wrong (a file missing, a spacing implausible, a label map on the wrong grid); its
message names the fix. The CLI prints the message and exits with 2; the panel shows it in an error dialog.
Any other exception is a programming error: the CLI prints the traceback and exits with 1, so a bug is never
reported as the user's mistake. It subclasses ValueError, so code that catches ValueError keeps working.
"""


class UserInputError(ValueError):
    """Bad input; the message says how to fix it."""
