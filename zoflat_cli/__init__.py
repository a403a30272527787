"""zoflat: an experiment runner for zeroth-order optimization research."""

__version__ = "0.1.0"


def version_line() -> str:
    return f"zoflat {__version__}"
