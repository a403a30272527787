"""Printing a line of a command's output. Apart from the live view (engine/live.py, which needs
Rich), so that the command line's start-up and refusals import no more than they print."""

import os
import sys


def say(text: str, err: bool = False) -> bool:
    """Print a line; a closed stdout (`zoflat ... | head -1`) silences further output instead of
    stopping the run. Returns whether the line went out."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=True)
        return True
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # so that the interpreter's last flush cannot fail
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
        return False
