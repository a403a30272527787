class ZoflatError(Exception):
    """A problem with the user's input or environment: shown as one line, exit status 2."""

    exit_code = 2


class RunFailed(ZoflatError):
    """A run folder's runs stopped on a failure of the machine (disk full, a write refused): the
    folder is marked failed and keeps everything written before. Exit status 1."""

    exit_code = 1
