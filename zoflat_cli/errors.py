"""The one-line errors: every problem with the user's input or environment is one `error:` line."""

import difflib


def suggestion(name: str, choices) -> str:
    """' (did you mean 'a'?)' or ' (did you mean 'a' or 'b'?)' for the closest choices, or ''."""
    close = difflib.get_close_matches(name, choices, n=2)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def one_line(text) -> str:
    """A message (or an exception's) on one line: the CLI prints every error as one."""
    return " ".join(str(text).split())


def describe(err: BaseException) -> str:
    """An exception as the reason a run folder records: its kind and its message, on one line."""
    return f"{type(err).__name__}: {one_line(err)}"


def require(package: str, flag: str, extra: str = None):
    """An optional package, or one line naming the flag that needs it and the extra that installs it
    (by default the extra of the package's name)."""
    try:
        return __import__(package)
    except ImportError:
        raise ZoflatError(f"{flag} needs {package}: pip install 'zoflat[{extra or package}]'") from None
    except Exception as err:  # a broken install fails in its own ways
        raise ZoflatError(f"{flag}: {package} is installed but fails to import ({describe(err)}); reinstall it: "
                          f"pip install --force-reinstall 'zoflat[{extra or package}]'") from None


class ZoflatError(Exception):
    """A problem with the user's input or environment: shown as one line, exit status 2."""

    exit_code = 2


class RunFailed(ZoflatError):
    """A run folder's runs stopped on a failure of the machine (disk full, a write refused): the
    folder is marked failed and keeps everything written before. Exit status 1."""

    exit_code = 1
