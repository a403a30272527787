class ZoflatError(Exception):
    """A problem with the user's input or environment: shown as one line, exit status 2."""
